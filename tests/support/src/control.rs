//! A real `ferry-control` process over a temporary state directory (local and Kubernetes mode), and ferryctl.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::free_addr;

/// `ferry-control`, with the test-only `testing` module (see [`built`]).
pub fn control_bin() -> PathBuf {
    built("ferry-control")
}

pub fn ctl_bin() -> PathBuf {
    built("ferryctl")
}

/// The directory of this test's profile (`target/debug` or `target/release`): the test binary runs from its `deps`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds ferry-control (with its `testing` feature) and ferryctl once per test process, in this test's profile and
/// target directory; `cargo test --workspace` has built the same already (this package turns the feature on), so
/// nothing is rebuilt there.
pub fn built(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let profile_dir = profile_dir();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args([
            "build",
            "-p",
            "ferry-control",
            "-p",
            "ferryctl",
            "--features",
            "ferry-control/testing",
            "--quiet",
        ]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "building ferry-control and ferryctl failed");
        profile_dir
    });
    dir.join(name)
}

/// `GET path` (HTTP/1.0): the status and the body, `None` when nothing answers.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(out)))
}

/// A `ferry-control serve` process over a state directory; killed when dropped.
pub struct ControlPlane {
    pub child: Child,
    pub api: SocketAddr,
    pub xds: SocketAddr,
    pub metrics: SocketAddr,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl ControlPlane {
    pub fn start(state: &Path) -> ControlPlane {
        Self::start_on(state, [free_addr(), free_addr(), free_addr()], &[])
    }

    /// Starts on the given API, xDS and metrics addresses (a restart reuses them), with extra arguments.
    pub fn start_on(state: &Path, addrs: [SocketAddr; 3], extra: &[&str]) -> ControlPlane {
        let cp = Self::spawn_on(state, addrs, extra);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(cp.api).is_err() {
            assert!(
                Instant::now() < deadline,
                "ferry-control did not start: {}",
                std::fs::read_to_string(&cp.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cp
    }

    pub fn spawn(state: &Path) -> ControlPlane {
        Self::spawn_on(state, [free_addr(), free_addr(), free_addr()], &[])
    }

    pub fn spawn_on(state: &Path, [api, xds, metrics]: [SocketAddr; 3], extra: &[&str]) -> ControlPlane {
        let log = state.with_extension("log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(control_bin())
            .args(["serve", "--state-dir", state.to_str().unwrap()])
            .args(["--api-addr", &api.to_string(), "--xds-addr", &xds.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(extra)
            .env("FERRY_LOG_LEVEL", "info,ferry_control=debug,ferry_api=debug")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        ControlPlane { child, api, xds, metrics, state: state.to_path_buf(), log }
    }

    pub fn addrs(&self) -> [SocketAddr; 3] {
        [self.api, self.xds, self.metrics]
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The control plane's `/metrics` text.
    pub fn metrics_text(&self) -> String {
        get(self.metrics, "/metrics").expect("the control plane's metrics port answers").1
    }

    /// Mints a join token for `namespace`/`service_account`.
    pub fn join_token(&self, namespace: &str, service_account: &str, ttl: &str) -> String {
        self.ok(
            &["token", "create", "--namespace", namespace, "--service-account", service_account, "--ttl", ttl],
            None,
        )
        .trim()
        .to_string()
    }

    /// The environment a proxy needs to use this control plane with `token`.
    pub fn proxy_env(&self, token: &str) -> Vec<(String, String)> {
        vec![
            ("FERRY_CONTROL_ADDR".into(), self.xds.to_string()),
            ("FERRY_CA_ROOT".into(), self.state.join("ca.crt").display().to_string()),
            ("FERRY_JOIN_TOKEN".into(), token.to_string()),
        ]
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state.join("admin.token")).unwrap()
    }

    /// Runs ferryctl against this control plane, with `stdin` piped in when given.
    pub fn ctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(ctl_bin())
            .args(args)
            .env("FERRY_TOKEN", self.token())
            .env("FERRY_CONTROL_API", format!("http://{}", self.api))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(pipe);
        child.wait_with_output().unwrap()
    }

    pub fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.ctl(args, stdin);
        assert!(out.status.success(), "ferryctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.ctl(args, stdin);
        assert!(!out.status.success(), "ferryctl {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn state_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-control-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `kubernetes-validate --strict` for Kubernetes 1.33 on `files`: fails on any error and on any warning (an unknown
/// kind, a deprecated field).
pub fn kubernetes_validate(files: &[PathBuf]) {
    // kubernetes-validate has no schema for `List`: its items are checked as documents of their own.
    let scratch = state_dir("kubernetes-validate");
    std::fs::create_dir_all(&scratch).unwrap();
    let files: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
            if !docs.iter().any(|d| d["kind"] == "List") {
                return f.clone();
            }
            let items = docs.iter().flat_map(|d| match d["items"].as_array() {
                Some(items) if d["kind"] == "List" => items.clone(),
                _ => vec![d.clone()],
            });
            let expanded: Vec<String> = items.map(|d| serde_json::to_string(&d).unwrap()).collect();
            let name = format!("{i}-items-of-{}", f.file_name().unwrap().to_string_lossy());
            std::fs::write(scratch.join(&name), expanded.join("\n---\n")).unwrap();
            scratch.join(name)
        })
        .collect();
    let out = Command::new("kubernetes-validate").args(["--strict", "-k", "1.33"]).args(&files).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let bad: Vec<&str> = text.lines().filter(|l| !l.starts_with("INFO")).collect();
    assert!(out.status.success() && bad.is_empty(), "kubernetes-validate:\n{text}");
    assert!(text.lines().count() >= files.len(), "kubernetes-validate checked too little:\n{text}");
    let _ = std::fs::remove_dir_all(&scratch);
}

/// A real `ferry-control serve --discovery kubernetes` reading the API server of `kubeconfig`, with xDS on `xds`,
/// returned once it has synced and serves; killed when dropped, and restartable with the same command (a replica
/// replaced: the root comes back from the Secret `ferry-ca`).
pub struct KubeControl {
    child: Child,
    pub xds: SocketAddr,
    pub metrics: SocketAddr,
    /// The loopback address of the read-only `GET /v1/status` (`--api-addr`), which `ferryctl --kubernetes status`
    /// reaches through `pods/portforward`.
    pub status: SocketAddr,
    pub state: PathBuf,
    pub log: PathBuf,
    command: Vec<String>,
    kubeconfig: PathBuf,
}

impl KubeControl {
    pub fn start(dir: &Path, kubeconfig: &Path, xds: SocketAddr) -> KubeControl {
        Self::start_with(dir, kubeconfig, xds, &[])
    }

    /// Started with more arguments (`--cert-lifetime 20s`, ...).
    pub fn start_with(dir: &Path, kubeconfig: &Path, xds: SocketAddr, extra: &[&str]) -> KubeControl {
        let state = dir.join("control-state");
        std::fs::create_dir_all(&state).unwrap();
        let (metrics, webhook, status) = (free_addr(), free_addr(), free_addr());
        let command: Vec<String> = [
            "serve",
            "--discovery",
            "kubernetes",
            "--state-dir",
            state.to_str().unwrap(),
            "--xds-addr",
            &xds.to_string(),
            "--metrics-addr",
            &metrics.to_string(),
            "--api-addr",
            &status.to_string(),
            "--webhook-addr",
            &webhook.to_string(),
            "--server-name",
            "ferry-control.ferry-system.svc",
        ]
        .map(String::from)
        .to_vec();
        let command = [command, extra.iter().map(|a| a.to_string()).collect()].concat();
        let log = dir.join("control.log");
        std::fs::File::create(&log).unwrap();
        let child = Self::spawn(&command, kubeconfig, &log);
        let control = KubeControl { child, xds, metrics, status, state, log, command, kubeconfig: kubeconfig.into() };
        control.wait_serving();
        control
    }

    fn spawn(command: &[String], kubeconfig: &Path, log: &Path) -> Child {
        let out = std::fs::OpenOptions::new().append(true).open(log).unwrap();
        Command::new(control_bin())
            .args(command)
            .env("KUBECONFIG", kubeconfig)
            .env("FERRY_LOG_LEVEL", "info,ferry_control=debug,ferry_api=debug")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(self.metrics, "/health/ready").map(|r| r.0) != Some(200) {
            assert!(Instant::now() < deadline, "ferry-control did not sync and serve:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The connected proxies (`GET /v1/status` on the loopback status address).
    pub fn proxies(&self) -> serde_json::Value {
        let text = get(self.status, "/v1/status").map(|r| r.1).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or_default()
    }

    /// SIGKILL, then the same command again.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.command, &self.kubeconfig, &self.log);
        self.wait_serving();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KubeControl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS connection to the control plane's xDS port as a proxy's first CSR makes it (no client certificate, ALPN h2),
/// the server's certificate checked against the mesh root in the state directory.
pub async fn xds_tls(cp: &ControlPlane) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(cp.state.join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(cp.xds).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap()
}
