//! Ferry's multi-process test helpers, one copy for every package's tests: a real `ferry` process on free loopback
//! ports ([`Ferry`]), small real backends, gRPC, network namespaces, the mesh, a real `ferry-control`
//! ([`control`]), the fake Kubernetes API server ([`apiserver`]) and prerequisites.

pub mod apiserver;
pub mod backend;
pub mod control;
pub mod grpc;
pub mod h2raw;
pub mod mesh;
pub mod netns;
mod prereq;
pub use prereq::{prerequisites, works};

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The `ferry` proxy of this test's profile: cargo builds it before it runs the root package's integration tests.
pub fn ferry_bin() -> PathBuf {
    control::profile_dir().join("ferry")
}

/// A loopback port that was free a moment ago. Taken below the kernel's ephemeral range (32768–60999 by default),
/// so no outgoing connection can take it before the process it is meant for binds it (a port from `bind(0)` could be,
/// and was, taken that way under load); each test process walks its own order through 10000–32767, each port once.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 32_768 - FIRST;
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free loopback port left below 32768");
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> SocketAddr {
    loopback(free_port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running `ferry` process; killed when dropped. Its logs are in `log_path`.
pub struct Ferry {
    pub child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub health: SocketAddr,
    pub log_path: PathBuf,
    pub dir: TempDir,
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `Service` document of the file source.
pub fn service_yaml(name: &str, port: u16, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{{address: \"{e}\"}}")).collect();
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: {port}}}]\n  endpoints: [{}]\n---\n",
        eps.join(", ")
    )
}

impl Ferry {
    /// Starts ferry with `config` (file source, if any) and extra env, and waits until it is ready.
    pub fn start(config: Option<&str>, env: &[(&str, &str)]) -> Ferry {
        Self::start_limited(config, env, None)
    }

    /// Starts ferry as `start` does, with its open-file limit (soft and hard) set to `open_files` (util-linux's
    /// `prlimit`, which execs ferry: the PID is ferry's).
    pub fn start_limited(config: Option<&str>, env: &[(&str, &str)], open_files: Option<u64>) -> Ferry {
        // A port that was free when picked can be taken before ferry binds it (by an outgoing connection's source
        // port): start again on new ports, a few times.
        for _ in 0..3 {
            let mut ferry = Self::spawn_limited(config, env, open_files);
            if ferry.wait_ready_unless_port_taken() {
                return ferry;
            }
        }
        panic!("ferry could not bind its ports three times in a row");
    }

    /// Waits for readiness; false when the process exited because a port was taken meanwhile.
    fn wait_ready_unless_port_taken(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_get(self.health, "/health/ready").map(|(s, _)| s) == Some(200) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait()
                && self.logs().contains("Address already in use")
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ferry not ready within 30s; log:\n{}", self.logs());
    }

    /// Starts ferry without waiting for readiness.
    pub fn spawn(config: Option<&str>, env: &[(&str, &str)]) -> Ferry {
        Self::spawn_limited(config, env, None)
    }

    fn spawn_limited(config: Option<&str>, env: &[(&str, &str)], open_files: Option<u64>) -> Ferry {
        let dir = TempDir::new("ferry");
        let (outbound, inbound, admin, health) =
            (loopback(free_port()), loopback(free_port()), loopback(free_port()), loopback(free_port()));
        let log_path = dir.path().join("ferry.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = match open_files {
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}")).arg("--").arg(ferry_bin());
                cmd
            }
            None => Command::new(ferry_bin()),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FERRY_OUTBOUND_ADDR", outbound.to_string())
            .env("FERRY_INBOUND_ADDR", inbound.to_string())
            .env("FERRY_ADMIN_ADDR", admin.to_string())
            .env("FERRY_HEALTH_ADDR", health.to_string())
            .env("FERRY_LOG_FORMAT", "json")
            .env("FERRY_LOG_LEVEL", "info,ferry=debug")
            .env("FERRY_CONFIG_POLL", "100ms")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(config) = config {
            let path = dir.path().join("ferry.yaml");
            std::fs::write(&path, config).unwrap();
            cmd.env("FERRY_CONFIG_FILE", &path);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start ferry");
        Ferry { child, outbound, inbound, admin, health, log_path, dir }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ferry.yaml")
    }

    /// Rewrites the config file (atomically, as a ConfigMap update would).
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir.path().join("ferry.yaml.tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(config.as_bytes()).unwrap();
        f.sync_all().unwrap();
        std::fs::rename(tmp, self.config_path()).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_get(self.health, "/health/ready").map(|(s, _)| s) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ferry not ready within 30s; log:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.health, "/metrics").expect("metrics").1
    }

    /// The value of a metric line that starts with `series` (name plus labels as Prometheus prints them), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident set size in KiB (and anonymous RSS), from /proc.
    pub fn rss_kib(&self) -> (u64, u64) {
        rss_kib(self.pid())
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- ferry log ----\n{}", self.logs());
        }
    }
}

pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// The value of `series` (`name` or `name{label="value",...}`) in a Prometheus text exposition: the sum over every
/// series of that name whose labels include the given ones (0 when none does).
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (name, wanted) = split_series(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, value) = l.rsplit_once(' ')?;
            let (n, labels) = split_series(s);
            (n == name && wanted.iter().all(|w| labels.contains(w))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `name{a="1",b="2"}` → (`name`, [`a="1"`, `b="2"`]) (label values hold no commas here).
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, rest)) => {
            let labels = rest.trim_end_matches('}');
            (name, labels.split(',').filter(|l| !l.is_empty()).collect())
        }
        None => (series, Vec::new()),
    }
}

/// A blocking GET for probes: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_exchange(addr, "GET", path, &[], "")
}

/// A blocking request with a method and body to an admin-style endpoint: (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    http_exchange(addr, method, path, &[], body)
}

/// One blocking HTTP/1.1 exchange on a fresh connection, closed after the response: (status, body). `headers` may
/// set `Host` (default `test`).
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    http_exchange_full(addr, method, path, headers, body).map(|r| (r.status, r.body))
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`), with the response's headers.
pub fn http_exchange_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<RawResponse> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let host = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")).map_or("test", |(_, v)| *v);
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers.iter().filter(|(k, _)| !k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    write!(s, "{head}\r\n{body}").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<Vec<(String, String)>>();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Some(RawResponse { status, headers, body })
}

/// The data of a chunked HTTP/1.1 body (`<hex size>\r\n<data>\r\n` ... `0\r\n\r\n`); what cannot be parsed is kept.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// Polls `f` every 25 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Constant load: one thread sending GETs for `host` through `proxy` until stopped (at most 60 s / 50,000 requests).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(proxy: SocketAddr, host: &'static str) -> Load {
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut failures = Vec::new();
            for _ in 0..50_000 {
                if s.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                match http_exchange(proxy, "GET", "/", &[("Host", host)], "").map(|(status, _)| status) {
                    Some(200) => o.fetch_add(1, Ordering::SeqCst),
                    other => {
                        failures.push(format!("{:?} after {:?}", other, started.elapsed()));
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                };
                std::thread::sleep(Duration::from_millis(2));
            }
            failures
        });
        Load { stop, ok, failed, thread: Some(thread) }
    }

    /// Stops the load and returns (ok, failed, failure descriptions).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.thread.take().unwrap().join().unwrap();
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst), failures)
    }
}
