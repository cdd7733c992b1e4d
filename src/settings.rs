//! Bootstrap settings from `FERRY_*` environment variables; a bad value stops start-up naming the variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_api::parse_duration;
use serde::{Deserialize, Serialize};

/// Everything the proxy starts with; shown verbatim by the admin `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub config_file: Option<PathBuf>,
    #[serde(serialize_with = "as_text")]
    pub config_poll: Duration,
    /// The xDS source: ferry-control's address, the root its serving certificate chains to, and the join token.
    pub control: Option<ControlSettings>,
    pub service: Option<String>,
    pub namespace: String,
    pub service_account: Option<String>,
    pub app_addr: Option<SocketAddr>,
    /// Local explicit mode: the port peers dial for this proxy's inbound side, when something (a port forward, a
    /// relay) sits in front of the inbound listener. Default: the first inbound listener's port.
    pub advertise_port: Option<u16>,
    pub workers: usize,
    #[serde(serialize_with = "as_text")]
    pub drain: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The share of requests logged (1: every one, 0: none).
    pub access_log: f64,
    #[serde(serialize_with = "as_text")]
    pub detect_timeout: Duration,
    pub opaque_ports: Vec<u16>,
    pub max_header_bytes: usize,
    #[serde(serialize_with = "as_text")]
    pub header_read_timeout: Duration,
    #[serde(serialize_with = "as_text")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "as_text")]
    pub pool_idle_timeout: Duration,
    /// A downstream HTTP connection with no request in flight for this long is wound down gracefully; an opaque TCP
    /// connection with no bytes either way that long is closed (a Service's `tcpIdleTimeout` may say otherwise).
    #[serde(serialize_with = "as_text")]
    pub idle_timeout: Duration,
    /// Open downstream connections per listener (inbound, outbound); at the cap the least useful is closed.
    pub max_connections: usize,
    /// Mirrored copies (HTTPRoute RequestMirror) in flight at once; a copy past it is dropped, never waited for.
    pub mirror_max_in_flight: usize,
    /// The share of new traces (requests arriving without trace context) that are sampled, 0-1.
    pub trace_sampling: f64,
    /// Where spans go (OTLP/gRPC, `http://host:port`); none: spans are not exported (context is still propagated).
    pub otlp_endpoint: Option<String>,
    /// The app's probes that injection moved onto the health port (`FERRY_APP_PROBES`), by path.
    pub app_probes: std::collections::BTreeMap<String, AppProbe>,
    /// The pod's IP (`FERRY_POD_IP`, from the downward API), where app probes go; default 127.0.0.1.
    pub pod_ip: std::net::IpAddr,
    /// With a control plane: subscribe to the Services this proxy calls, on first use (`FERRY_ON_DEMAND`, default
    /// on), rather than to every Service of the mesh.
    pub on_demand: bool,
    /// An on-demand subscription unused this long is released (`FERRY_SUBSCRIPTION_IDLE`).
    #[serde(serialize_with = "as_text")]
    pub subscription_idle: Duration,
    /// How long the answer "no Service there" is kept before the control plane is asked again
    /// (`FERRY_NEGATIVE_TTL`).
    #[serde(serialize_with = "as_text")]
    pub negative_ttl: Duration,
}

/// Where and how the proxy reaches ferry-control.
#[derive(Debug, Clone, Serialize)]
pub struct ControlSettings {
    /// `host:port`.
    pub addr: String,
    /// The name the serving certificate must carry (default: the host of `addr`).
    pub server_name: String,
    pub ca_root: PathBuf,
    /// The bootstrap credential for the first certificate.
    pub credential: Credential,
    /// The node id shown by `ferryctl status` (default `<hostname>-<pid>`).
    pub node_id: String,
}

/// What a proxy proves its identity with when it has no certificate yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Credential {
    /// Local mode: a join token (`FERRY_JOIN_TOKEN`); never shown.
    #[serde(serialize_with = "hidden")]
    JoinToken(String),
    /// Kubernetes: the file of the pod's projected, audience-bound ServiceAccount token
    /// (`FERRY_SERVICE_ACCOUNT_TOKEN`), read again for every request because the kubelet rotates it.
    ServiceAccountToken(PathBuf),
}

fn hidden<S: serde::Serializer>(_: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("(hidden)")
}

/// Probe headers as `[name, "(hidden)"]` pairs.
fn header_names<S: serde::Serializer>(headers: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(headers.iter().map(|(name, _)| (name, "(hidden)")))
}

impl Credential {
    /// The bearer token to send now.
    pub fn token(&self) -> Result<String, String> {
        match self {
            Credential::JoinToken(t) => Ok(t.clone()),
            Credential::ServiceAccountToken(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("reading the ServiceAccount token {}: {e}", path.display())),
        }
    }
}

/// Shows durations as the settings take them (`1.5s`, `250ms`) in `/config_dump`.
fn as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{d:?}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// A setting that could not be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?}: {message}")]
pub struct BootstrapError {
    pub var: &'static str,
    pub value: String,
    pub message: String,
}

/// The documented defaults (README, "Settings").
pub mod defaults {
    pub const OUTBOUND_ADDR: &str = "127.0.0.1:15001,[::1]:15001";
    pub const INBOUND_ADDR: &str = "0.0.0.0:15006,[::]:15006";
    pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
    pub const HEALTH_ADDR: &str = "0.0.0.0:15020";
    pub const OPAQUE_PORTS: &str = "25,587,3306,4444,5432,6379,9300,11211";
    pub const DRAIN_SECONDS: u64 = 25;
    pub const DETECT_TIMEOUT: &str = "10s";
    pub const MAX_HEADER_BYTES: usize = 64 * 1024;
    pub const HEADER_READ_TIMEOUT: &str = "10s";
    pub const CONNECT_TIMEOUT: &str = "1s";
    pub const POOL_IDLE_TIMEOUT: &str = "60s";
    /// Envoy's HTTP connection manager's default `idle_timeout`; it also bounds opaque TCP, as Envoy's tcp_proxy does.
    pub const IDLE_TIMEOUT: &str = "1h";
    pub const TRACE_SAMPLING: &str = "0.01";
    pub const MIRROR_MAX_IN_FLIGHT: usize = 100;
    /// Linkerd's proxy drops an idle destination's discovery after a minute; a caller that calls every few minutes
    /// should not pay the first-call wait each time.
    pub const SUBSCRIPTION_IDLE: &str = "5m";
    pub const NEGATIVE_TTL: &str = "30s";

    /// Open connections per listener: a fifth of what the open-file limit leaves after 64 for the process itself
    /// (each downstream connection may hold an upstream one, and there are two listeners), at most 100,000; 1,024
    /// open files give 192.
    pub fn max_connections() -> usize {
        let files = open_files_limit().unwrap_or(1024);
        (files.saturating_sub(64) / 5).clamp(16, 100_000) as usize
    }

    /// The soft `RLIMIT_NOFILE`, from `/proc/self/limits` (no libc call needed).
    fn open_files_limit() -> Option<u64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        match line.split_whitespace().nth(3)? {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        }
    }
    pub const CONFIG_POLL: &str = "1s";
}

impl Settings {
    /// The Services this proxy declares it serves (`FERRY_SERVICE`: comma-separated, each `namespace/name` or a
    /// name in `FERRY_NAMESPACE`), as (namespace, name).
    pub fn declared_services(&self) -> Vec<(String, String)> {
        let Some(list) = &self.service else { return Vec::new() };
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('/') {
                Some((ns, name)) => (ns.to_string(), name.to_string()),
                None => (self.namespace.clone(), s.to_string()),
            })
            .collect()
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, BootstrapError> {
        Self::from_lookup(|k| std::env::var(k).ok(), std::io::IsTerminal::is_terminal(&std::io::stderr()))
    }

    /// Reads settings through `get` (a map in tests); `terminal` picks the default log format.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>, terminal: bool) -> Result<Self, BootstrapError> {
        let env = Env(&get);
        let workers_default = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let s = Settings {
            outbound_addrs: env.list("FERRY_OUTBOUND_ADDR", defaults::OUTBOUND_ADDR)?,
            inbound_addrs: env.list("FERRY_INBOUND_ADDR", defaults::INBOUND_ADDR)?,
            admin_addr: env.parse("FERRY_ADMIN_ADDR", defaults::ADMIN_ADDR)?,
            health_addr: env.parse("FERRY_HEALTH_ADDR", defaults::HEALTH_ADDR)?,
            config_file: env.raw("FERRY_CONFIG_FILE").filter(|s| !s.is_empty()).map(PathBuf::from),
            config_poll: env.duration("FERRY_CONFIG_POLL", defaults::CONFIG_POLL)?,
            control: control_settings(&env)?,
            service: env.raw("FERRY_SERVICE").filter(|s| !s.is_empty()),
            namespace: env.raw("FERRY_NAMESPACE").filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()),
            service_account: env.raw("FERRY_SERVICE_ACCOUNT").filter(|s| !s.is_empty()),
            app_addr: match env.raw("FERRY_APP_ADDR").filter(|s| !s.is_empty()) {
                Some(v) => Some(env.parse("FERRY_APP_ADDR", &v)?),
                None => None,
            },
            advertise_port: match env.raw("FERRY_ADVERTISE_PORT").filter(|s| !s.is_empty()) {
                Some(v) => Some(env.parse("FERRY_ADVERTISE_PORT", &v)?),
                None => None,
            },
            workers: env.parse("FERRY_WORKERS", &workers_default.to_string())?,
            drain: Duration::from_secs(env.parse("FERRY_DRAIN_SECONDS", &defaults::DRAIN_SECONDS.to_string())?),
            log_format: match env.raw("FERRY_LOG_FORMAT").as_deref() {
                None | Some("") => {
                    if terminal {
                        LogFormat::Text
                    } else {
                        LogFormat::Json
                    }
                }
                Some("json") => LogFormat::Json,
                Some("text") => LogFormat::Text,
                Some(other) => {
                    return Err(env.error("FERRY_LOG_FORMAT", other, "must be json or text"));
                }
            },
            log_level: env.raw("FERRY_LOG_LEVEL").filter(|s| !s.is_empty()).unwrap_or_else(|| "info".into()),
            access_log: match env.raw("FERRY_ACCESS_LOG").as_deref() {
                None | Some("") | Some("on") | Some("true") => 1.0,
                Some("off") | Some("false") => 0.0,
                Some(other) => match other.parse::<f64>() {
                    Ok(share) if (0.0..=1.0).contains(&share) => share,
                    _ => {
                        let message = "must be on, off, or the share of requests to log (0-1, e.g. 0.1)";
                        return Err(env.error("FERRY_ACCESS_LOG", other, message));
                    }
                },
            },
            detect_timeout: env.duration("FERRY_DETECT_TIMEOUT", defaults::DETECT_TIMEOUT)?,
            opaque_ports: env.list("FERRY_OPAQUE_PORTS", defaults::OPAQUE_PORTS)?,
            max_header_bytes: env.parse("FERRY_MAX_HEADER_BYTES", &defaults::MAX_HEADER_BYTES.to_string())?,
            header_read_timeout: env.duration("FERRY_HEADER_READ_TIMEOUT", defaults::HEADER_READ_TIMEOUT)?,
            connect_timeout: env.duration("FERRY_CONNECT_TIMEOUT", defaults::CONNECT_TIMEOUT)?,
            pool_idle_timeout: env.duration("FERRY_POOL_IDLE_TIMEOUT", defaults::POOL_IDLE_TIMEOUT)?,
            idle_timeout: env.duration("FERRY_IDLE_TIMEOUT", defaults::IDLE_TIMEOUT)?,
            max_connections: env.parse("FERRY_MAX_CONNECTIONS", &defaults::max_connections().to_string())?,
            mirror_max_in_flight: env
                .parse("FERRY_MIRROR_MAX_IN_FLIGHT", &defaults::MIRROR_MAX_IN_FLIGHT.to_string())?,
            trace_sampling: env.parse("FERRY_TRACE_SAMPLING", defaults::TRACE_SAMPLING)?,
            otlp_endpoint: env.raw("FERRY_OTLP_ENDPOINT").filter(|s| !s.is_empty()),
            app_probes: match env.raw("FERRY_APP_PROBES").filter(|s| !s.trim().is_empty()) {
                Some(json) => parse_app_probes(&json).map_err(|e| env.error("FERRY_APP_PROBES", &json, &e))?,
                None => Default::default(),
            },
            pod_ip: env.parse(
                "FERRY_POD_IP",
                &env.raw("FERRY_POD_IP").filter(|s| !s.is_empty()).unwrap_or("127.0.0.1".into()),
            )?,
            on_demand: match env.raw("FERRY_ON_DEMAND").as_deref() {
                None | Some("") | Some("on") | Some("true") => true,
                Some("off") | Some("false") => false,
                Some(other) => return Err(env.error("FERRY_ON_DEMAND", other, "must be on or off")),
            },
            subscription_idle: env.duration("FERRY_SUBSCRIPTION_IDLE", defaults::SUBSCRIPTION_IDLE)?,
            negative_ttl: env.duration("FERRY_NEGATIVE_TTL", defaults::NEGATIVE_TTL)?,
        };
        if !(0.0..=1.0).contains(&s.trace_sampling) {
            let value = s.trace_sampling.to_string();
            return Err(env.error("FERRY_TRACE_SAMPLING", &value, "must be a share between 0 and 1 (0.01 = 1 %)"));
        }
        if let Some(endpoint) = &s.otlp_endpoint {
            let scheme = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !scheme || endpoint.parse::<http::Uri>().is_err() {
                let message = "must be an http:// or https:// URI (OTLP over gRPC)";
                return Err(env.error("FERRY_OTLP_ENDPOINT", endpoint, message));
            }
        }
        if let (Some(_), Some(file)) = (&s.control, &s.config_file) {
            let message = "FERRY_CONFIG_FILE and FERRY_CONTROL_ADDR are both set; choose one config source";
            return Err(env.error("FERRY_CONFIG_FILE", &file.display().to_string(), message));
        }
        if s.workers == 0 {
            return Err(env.error("FERRY_WORKERS", "0", "must be at least 1"));
        }
        if s.max_connections == 0 {
            return Err(env.error("FERRY_MAX_CONNECTIONS", "0", "must be at least 1"));
        }
        if s.max_header_bytes < 1024 {
            return Err(env.error("FERRY_MAX_HEADER_BYTES", &s.max_header_bytes.to_string(), "must be at least 1024"));
        }
        for (var, d) in [
            ("FERRY_DETECT_TIMEOUT", s.detect_timeout),
            ("FERRY_CONFIG_POLL", s.config_poll),
            ("FERRY_SUBSCRIPTION_IDLE", s.subscription_idle),
            ("FERRY_NEGATIVE_TTL", s.negative_ttl),
        ] {
            if d.is_zero() {
                return Err(env.error(var, "0s", "must be more than zero"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&s.log_level) {
            return Err(env.error("FERRY_LOG_LEVEL", &s.log_level, &e.to_string()));
        }
        Ok(s)
    }
}

/// `FERRY_CONTROL_ADDR` and the variables it requires (`FERRY_CA_ROOT`, `FERRY_JOIN_TOKEN`).
fn control_settings<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Option<ControlSettings>, BootstrapError> {
    let Some(addr) = env.raw("FERRY_CONTROL_ADDR").filter(|s| !s.is_empty()) else { return Ok(None) };
    let (host, port) = ferry_api::split_host_port(&addr);
    if host.is_empty() || port.and_then(ferry_api::port_number).is_none_or(|p| p == 0) {
        return Err(env.error("FERRY_CONTROL_ADDR", &addr, "must be host:port (e.g. 127.0.0.1:15010)"));
    }
    let required = |var: &'static str, what: &str| {
        env.raw(var)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| env.error(var, "", &format!("is required with FERRY_CONTROL_ADDR: {what}")))
    };
    let ca_root = PathBuf::from(required("FERRY_CA_ROOT", "the PEM file of the mesh root")?);
    if !ca_root.is_file() {
        return Err(env.error("FERRY_CA_ROOT", &ca_root.display().to_string(), "no such file"));
    }
    let credential = match env.raw("FERRY_SERVICE_ACCOUNT_TOKEN").filter(|s| !s.trim().is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path.trim());
            if !path.is_file() {
                return Err(env.error("FERRY_SERVICE_ACCOUNT_TOKEN", &path.display().to_string(), "no such file"));
            }
            Credential::ServiceAccountToken(path)
        }
        None => Credential::JoinToken(
            required(
                "FERRY_JOIN_TOKEN",
                "the proxy's join token (ferryctl token create), or FERRY_SERVICE_ACCOUNT_TOKEN in Kubernetes",
            )?
            .trim()
            .to_string(),
        ),
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "ferry".into());
    Ok(Some(ControlSettings {
        server_name: env
            .raw("FERRY_CONTROL_SERVER_NAME")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_string()),
        addr,
        ca_root,
        credential,
        node_id: env
            .raw("FERRY_NODE_ID")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{}-{}", hostname.trim(), std::process::id())),
    }))
}

struct Env<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn raw(&self, var: &str) -> Option<String> {
        (self.0)(var)
    }
    fn error(&self, var: &'static str, value: &str, message: &str) -> BootstrapError {
        BootstrapError { var, value: value.to_string(), message: message.to_string() }
    }
    fn parse<T: std::str::FromStr>(&self, var: &'static str, default: &str) -> Result<T, BootstrapError>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.raw(var).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string());
        value.trim().parse().map_err(|e: T::Err| self.error(var, &value, &e.to_string()))
    }
    fn list<T: std::str::FromStr>(&self, var: &'static str, default: &str) -> Result<Vec<T>, BootstrapError>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.raw(var).unwrap_or_else(|| default.to_string());
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| item.parse().map_err(|e: T::Err| self.error(var, &value, &format!("`{item}`: {e}"))))
            .collect()
    }
    fn duration(&self, var: &'static str, default: &str) -> Result<Duration, BootstrapError> {
        let value = self.raw(var).filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string());
        parse_duration(&value).map_err(|e| self.error(var, &value, &e.to_string()))
    }
}

// ===== FERRY_APP_PROBES =====

/// One rewritten probe: what the app's container asked the kubelet to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppProbe {
    pub port: u16,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `GET path` with the probe's headers; the app's status is the answer (the kubelet takes 200-399 as success).
    /// `/config_dump` shows the headers' names only: a value may be a credential.
    Http {
        path: String,
        #[serde(serialize_with = "header_names")]
        headers: Vec<(String, String)>,
    },
    /// The app accepts a connection.
    Tcp,
}

/// The injector's JSON (`FERRY_APP_PROBES`): `{"/app-health/<container>/<kind>": {"httpGet"|"tcpSocket": <the
/// original action>, "port": <its number>}}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    port: u16,
    http_get: Option<HttpGet>,
    tcp_socket: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpGet {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    http_headers: Vec<Header>,
}

#[derive(Deserialize)]
struct Header {
    name: String,
    value: String,
}

/// Parses `FERRY_APP_PROBES`; the error says which entry is wrong.
pub fn parse_app_probes(json: &str) -> Result<BTreeMap<String, AppProbe>, String> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON object of probes: {e}"))?;
    raw.into_iter()
        .map(|(path, value)| {
            if !path.starts_with("/app-health/") {
                return Err(format!("`{path}`: probe paths start with /app-health/"));
            }
            let wire: Wire = serde_json::from_value(value).map_err(|e| format!("`{path}`: {e}"))?;
            if wire.port == 0 {
                return Err(format!("`{path}`: port must be 1-65535"));
            }
            let action = match (wire.http_get, wire.tcp_socket) {
                (Some(get), None) => Action::Http {
                    path: get.path.filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into()),
                    headers: get.http_headers.into_iter().map(|h| (h.name, h.value)).collect(),
                },
                (None, Some(_)) => Action::Tcp,
                _ => return Err(format!("`{path}`: needs exactly one of httpGet and tcpSocket")),
            };
            Ok((path, AppProbe { port: wire.port, action }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, BootstrapError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(|k| map.get(k).cloned(), false)
    }

    #[test]
    fn defaults_match_design() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.outbound_addrs, vec!["127.0.0.1:15001".parse().unwrap(), "[::1]:15001".parse().unwrap()]);
        assert_eq!(s.inbound_addrs, vec!["0.0.0.0:15006".parse().unwrap(), "[::]:15006".parse().unwrap()]);
        assert_eq!(s.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(s.health_addr, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(s.drain, Duration::from_secs(25));
        assert_eq!(s.detect_timeout, Duration::from_secs(10));
        assert_eq!(s.opaque_ports, vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211]);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.access_log, 1.0);
    }

    /// Each bad value and the variable its error must name.
    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("FERRY_OUTBOUND_ADDR", "127.0.0.1:99999"),
            ("FERRY_INBOUND_ADDR", "localhost:15006"),
            ("FERRY_ADMIN_ADDR", "nope"),
            ("FERRY_WORKERS", "0"),
            ("FERRY_WORKERS", "two"),
            ("FERRY_DRAIN_SECONDS", "25s"),
            ("FERRY_DETECT_TIMEOUT", "10"),
            ("FERRY_DETECT_TIMEOUT", "0s"),
            ("FERRY_OPAQUE_PORTS", "25,x"),
            ("FERRY_LOG_FORMAT", "xml"),
            ("FERRY_LOG_LEVEL", "ferry=loud"),
            ("FERRY_ACCESS_LOG", "maybe"),
            ("FERRY_ACCESS_LOG", "1.5"),
            ("FERRY_TRACE_SAMPLING", "2"),
            ("FERRY_TRACE_SAMPLING", "1%"),
            ("FERRY_OTLP_ENDPOINT", "collector:4317"),
            ("FERRY_APP_ADDR", "app:8080"),
            ("FERRY_MAX_HEADER_BYTES", "10"),
            ("FERRY_CONTROL_ADDR", "ferry-control"),
            ("FERRY_CONTROL_ADDR", "127.0.0.1:0"),
            ("FERRY_APP_PROBES", "{\"/healthz\": {}}"),
            ("FERRY_POD_IP", "pod"),
        ];
        for (var, value) in cases {
            let err = settings(&[(var, value)]).expect_err(var).to_string();
            assert!(err.starts_with(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn control_plane_needs_root_and_token() {
        let root = std::env::temp_dir().join(format!("ferry-bootstrap-root-{}.pem", std::process::id()));
        std::fs::write(&root, "pem").unwrap();
        let root = root.to_str().unwrap();
        let addr = ("FERRY_CONTROL_ADDR", "127.0.0.1:15010");
        let err = settings(&[addr]).unwrap_err().to_string();
        assert!(err.starts_with("FERRY_CA_ROOT") && err.contains("required"), "{err}");
        let err = settings(&[addr, ("FERRY_CA_ROOT", "/nonexistent.pem")]).unwrap_err().to_string();
        assert!(err.starts_with("FERRY_CA_ROOT") && err.contains("no such file"), "{err}");
        let err = settings(&[addr, ("FERRY_CA_ROOT", root)]).unwrap_err().to_string();
        assert!(err.starts_with("FERRY_JOIN_TOKEN"), "{err}");
        let all = [addr, ("FERRY_CA_ROOT", root), ("FERRY_JOIN_TOKEN", "id.secret")];
        let s = settings(&all).unwrap();
        let control = s.control.as_ref().unwrap();
        assert_eq!(
            (control.server_name.as_str(), control.credential.token().unwrap().as_str()),
            ("127.0.0.1", "id.secret")
        );
        assert!(!serde_json::to_string(&s).unwrap().contains("secret"), "the token never shows in /config_dump");
        let err = settings(&[all[0], all[1], all[2], ("FERRY_CONFIG_FILE", "/x.yaml")]).unwrap_err().to_string();
        assert!(err.starts_with("FERRY_CONFIG_FILE") && err.contains("choose one"), "{err}");

        // Kubernetes: the projected ServiceAccount token instead of a join token, read again for each use.
        let token = std::env::temp_dir().join(format!("ferry-bootstrap-token-{}", std::process::id()));
        std::fs::write(&token, "eyJ.first\n").unwrap();
        let with_token = [addr, ("FERRY_CA_ROOT", root), ("FERRY_SERVICE_ACCOUNT_TOKEN", token.to_str().unwrap())];
        let s = settings(&with_token).unwrap();
        let credential = &s.control.as_ref().unwrap().credential;
        assert_eq!(credential.token().unwrap(), "eyJ.first");
        std::fs::write(&token, "eyJ.rotated").unwrap();
        assert_eq!(credential.token().unwrap(), "eyJ.rotated", "a rotated token is picked up");
        let err = settings(&[addr, ("FERRY_CA_ROOT", root), ("FERRY_SERVICE_ACCOUNT_TOKEN", "/nonexistent")]);
        assert!(err.unwrap_err().to_string().starts_with("FERRY_SERVICE_ACCOUNT_TOKEN"));
        std::fs::remove_file(token).unwrap();
        std::fs::remove_file(root).unwrap();
    }

    #[test]
    fn config_dump_hides_probe_header_values() {
        let probes = r#"{"/app-health/web/live": {"httpGet": {"path": "/healthz",
                         "httpHeaders": [{"name": "Authorization", "value": "Bearer s3cret"}]}, "port": 8080}}"#;
        let s = settings(&[("FERRY_APP_PROBES", probes)]).unwrap();
        let dump = serde_json::to_string(&s).unwrap();
        assert!(dump.contains("Authorization") && dump.contains("/healthz"), "{dump}");
        assert!(!dump.contains("s3cret"), "a probe header's value is shown: {dump}");
        // The probe itself still sends it.
        let Action::Http { headers, .. } = &s.app_probes["/app-health/web/live"].action else { panic!() };
        assert_eq!(headers[0].1, "Bearer s3cret");
    }

    #[test]
    fn parses_the_injectors_json() {
        let json = r#"{"/app-health/web/live": {"httpGet": {"path": "/healthz", "port": "http",
                        "httpHeaders": [{"name": "X-Probe", "value": "liveness"}]}, "port": 8080},
                      "/app-health/web/ready": {"tcpSocket": {"port": 8080}, "port": 8080}}"#;
        let probes = parse_app_probes(json).unwrap();
        assert_eq!(
            probes["/app-health/web/live"],
            AppProbe {
                port: 8080,
                action: Action::Http { path: "/healthz".into(), headers: vec![("X-Probe".into(), "liveness".into())] }
            }
        );
        assert_eq!(probes["/app-health/web/ready"].action, Action::Tcp);
        for (bad, want) in [
            ("[]", "not a JSON object"),
            (r#"{"/x": {"tcpSocket": {}, "port": 1}}"#, "start with /app-health/"),
            (r#"{"/app-health/a/live": {"port": 1}}"#, "exactly one of"),
            (r#"{"/app-health/a/live": {"tcpSocket": {}, "port": 0}}"#, "port must be"),
            (r#"{"/app-health/a/live": {"tcpSocket": {}, "port": 70000}}"#, "/app-health/a/live"),
        ] {
            let err = parse_app_probes(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
