//! A small test "node" for the `pods` suite: it runs a Kubernetes pod from its spec, exactly as injection wrote it, in
//! real containers of the project's images — a pause container holding the pod's network namespace on a Docker
//! network of the node's own (198.19.0.0/16, internal: nothing leaves the machine, nothing is SNATed), and every
//! container of the spec joined to it, with the spec's image, command, args, user, capabilities, read-only root,
//! `no-new-privileges`, env (downward-API fields resolved, `$(VAR)` expanded) and volumes (emptyDirs as tmpfs, the
//! projected token and the `ferry-ca-root` ConfigMap as files the test provides). Init containers run in order to
//! completion; a native sidecar (an init container with `restartPolicy: Always`) is started and waited for until its
//! startup probe passes, as the kubelet does, before what follows; app containers (image [`APP_IMAGE`]) are the
//! tests' own `pod_app` on the base image.
//!
//! What it does not model: scheduling, cgroup limits (requests and limits are ignored), image pulls (the images are
//! built locally from `deploy/Dockerfile`), Services' DNS, kube-proxy, probes other than the sidecar's startup probe,
//! readiness, the endpoint-slice controller and deletion order — the next parts of the suite.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The image name a test spec gives its app containers: the node runs them as the tests' own `pod_app` binary
/// (`examples/pod_app.rs`, built with the tests) on the base image.
pub const APP_IMAGE: &str = "ferry-test/app:1";

/// The `pod_app` example of this build (`cargo test --workspace` builds it; a single test target builds it here).
pub fn app_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile = exe.parent().unwrap().parent().unwrap().to_path_buf();
            let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            build.args(["build", "-p", "ferry", "--example", "pod_app", "--quiet"]);
            if profile.ends_with("release") {
                build.arg("--release");
            }
            assert!(build.status().unwrap().success(), "building examples/pod_app failed");
            profile.join("examples/pod_app")
        })
        .clone()
}

/// Debian's Docker client: it builds with the engine's own BuildKit (a newer client on PATH would want buildx).
pub fn docker() -> Command {
    Command::new(if Path::new("/usr/bin/docker").exists() { "/usr/bin/docker" } else { "docker" })
}

/// Runs docker and returns its output (whatever the exit status).
pub fn docker_run(args: &[&str]) -> Output {
    docker().args(args).output().unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")))
}

/// Runs docker, panicking with its output when it fails; returns stdout.
pub fn docker_must(args: &[&str]) -> String {
    let out = docker_run(args);
    assert!(
        out.status.success(),
        "docker {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether a Docker engine answers and debootstrap is installed. Under `CI=true` a missing one fails the test.
pub fn available(test: &str) -> bool {
    let engine = docker().args(["info"]).output().is_ok_and(|o| o.status.success());
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let debootstrap = Path::new("/usr/sbin/debootstrap").exists();
    super::support::prerequisites(
        test,
        &[("root", root), ("a Docker engine (dockerd)", engine), ("debootstrap", debootstrap)],
    )
}

/// The images the node runs, built once per test process from `deploy/Dockerfile` with this build's binaries (so no
/// test runs a stale image): the proxy on the debootstrap base, the control plane on scratch.
pub struct Images {
    pub proxy: String,
    pub base: String,
}

pub fn images() -> &'static Images {
    static IMAGES: std::sync::OnceLock<Images> = std::sync::OnceLock::new();
    IMAGES.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let ferry = PathBuf::from(env!("CARGO_BIN_EXE_ferry"));
        // The control plane's binaries are built for this test profile by the shared helper.
        let _ = super::control::control_bin();
        let bin = ferry.parent().unwrap();
        let out = Command::new("bash")
            .arg(root.join("deploy/build-images.sh"))
            .env("BIN", bin)
            .env("TAG", "pods")
            .env("IMAGES", "proxy")
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "deploy/build-images.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Images { proxy: "ferry/proxy:pods".into(), base: "ferry/debian-base:bookworm".into() }
    })
}

/// The node: a Docker network of its own; every container it started is removed when it is dropped.
pub struct Node {
    pub network: String,
    /// `198.19.<k>`: pods get `.<n>`, the host side (the network's gateway) `.1`.
    pub prefix: String,
    containers: Mutex<Vec<String>>,
    pub dir: super::support::TempDir,
}

impl Node {
    pub fn new(tag: &str) -> Node {
        // Each node of this process its own subnet (tests run in parallel), apart from other processes' as far as
        // 50 of them go.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = ((std::process::id() % 50) * 5 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5) % 250 + 1;
        let network = format!("ferry-pods-{}-{tag}", std::process::id());
        let prefix = format!("198.19.{k}");
        // Networks a crashed run left behind (its process is gone) would hold their subnets: removed first.
        let existing = docker_must(&["network", "ls", "--format", "{{.Name}}", "--filter", "name=ferry-pods-"]);
        for stale in existing.lines() {
            let pid = stale.strip_prefix("ferry-pods-").and_then(|r| r.split('-').next());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) || stale == network {
                let containers = docker_must(&["ps", "-aq", "--filter", &format!("network={stale}")]);
                for id in containers.lines() {
                    let _ = docker_run(&["rm", "-f", id]);
                }
                let _ = docker_run(&["network", "rm", stale]);
            }
        }
        docker_must(&[
            "network",
            "create",
            "--internal",
            "--subnet",
            &format!("{prefix}.0/24"),
            "--gateway",
            &format!("{prefix}.1"),
            &network,
        ]);
        Node {
            network,
            prefix,
            containers: Mutex::new(Vec::new()),
            dir: super::support::TempDir::new(&format!("pods-{tag}")),
        }
    }

    fn track(&self, name: &str) {
        self.containers.lock().unwrap().push(name.to_string());
    }

    /// Starts the pause container of pod `pod` at `<prefix>.<n>` (`hosts`: extra /etc/hosts entries, name and IP) and
    /// returns the pod with its `spec` (the namespace is the spec's) and `volumes`; its containers are yet to run.
    pub fn pod(
        &self,
        pod: &str,
        n: u8,
        hosts: &[(&str, &str)],
        spec: Value,
        volumes: BTreeMap<String, PathBuf>,
    ) -> Pod {
        let name = format!("{}-{pod}", self.network);
        let ip = format!("{}.{n}", self.prefix);
        let mut args: Vec<String> =
            ["run", "-d", "--name", &name, "--network", &self.network, "--ip", &ip, "--hostname", pod]
                .map(String::from)
                .to_vec();
        for (host, addr) in hosts {
            args.push(format!("--add-host={host}:{addr}"));
        }
        args.extend([images().base.clone(), "sleep".into(), "infinity".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_must(&args);
        self.track(&name);
        let namespace = spec["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        Pod { name: pod.into(), namespace, spec, pause: name, ip, volumes }
    }

    /// `docker run` arguments for one container of a pod spec, joined to the pod's pause container: image (mapped
    /// by `image`), user, capabilities, read-only root, no-new-privileges, env, volumes from `volumes` (name → host
    /// path; an emptyDir not listed becomes a tmpfs), command and args.
    pub fn container_args(
        &self,
        pod: &Pod,
        container: &Value,
        image: &dyn Fn(&str) -> String,
        detach: bool,
    ) -> Vec<String> {
        let name = format!("{}-{}-{}", self.network, pod.name, container["name"].as_str().unwrap());
        let mut args: Vec<String> = vec!["run".into()];
        args.push(if detach { "-d".into() } else { "--rm".into() });
        args.extend(["--name".into(), name.clone(), "--network".into(), format!("container:{}", pod.pause)]);
        let security = &container["securityContext"];
        let pod_security = &pod.spec["spec"]["securityContext"];
        let id = |key: &str| security[key].as_i64().or_else(|| pod_security[key].as_i64());
        if let Some(user) = id("runAsUser") {
            args.push(format!("--user={user}:{}", id("runAsGroup").unwrap_or(user)));
        }
        for cap in security["capabilities"]["drop"].as_array().into_iter().flatten() {
            args.push(format!("--cap-drop={}", cap.as_str().unwrap()));
        }
        for cap in security["capabilities"]["add"].as_array().into_iter().flatten() {
            args.push(format!("--cap-add={}", cap.as_str().unwrap()));
        }
        if security["readOnlyRootFilesystem"] == true {
            args.push("--read-only".into());
        }
        if security["allowPrivilegeEscalation"] == false {
            args.push("--security-opt=no-new-privileges".into());
        }
        assert_ne!(security["privileged"], true, "the node runs no privileged container");
        // RuntimeDefault seccomp is Docker's default profile: nothing to add.
        for (k, v) in pod.env(container) {
            args.push(format!("--env={k}={v}"));
        }
        let volumes: BTreeMap<&str, &Value> = pod.spec["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| (v["name"].as_str().unwrap(), v))
            .collect();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let (vol, path) = (mount["name"].as_str().unwrap(), mount["mountPath"].as_str().unwrap());
            let ro = if mount["readOnly"] == true { ":ro" } else { "" };
            match pod.volumes.get(vol) {
                Some(host) => args.push(format!("--volume={}:{path}{ro}", host.display())),
                None if volumes.get(vol).is_some_and(|v| v["emptyDir"].is_object()) => {
                    args.push(format!("--tmpfs={path}"));
                }
                None => panic!("{}: no source for volume {vol}", pod.name),
            }
        }
        let command: Vec<String> =
            container["command"].as_array().into_iter().flatten().map(|c| c.as_str().unwrap().to_string()).collect();
        if let Some(entry) = command.first() {
            args.push(format!("--entrypoint={entry}"));
        }
        let spec_image = container["image"].as_str().unwrap();
        if spec_image == APP_IMAGE {
            // The tests' own app and client, on the base image.
            args.push(format!("--volume={}:/pod_app:ro", app_binary().display()));
            args.push(images().base.clone());
        } else {
            args.push(image(spec_image));
        }
        args.extend(command.iter().skip(1).cloned());
        args.extend(container["args"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap().to_string()));
        if detach {
            self.track(&name);
        }
        args
    }

    /// Runs a pod as the kubelet would: the pause container, the init containers in order (each to completion; a
    /// native sidecar is started and waited for until its startup probe passes), then the app containers.
    pub fn run_pod(&self, pod: &Pod, image: &dyn Fn(&str) -> String) -> Result<(), String> {
        for init in pod.init_containers() {
            if init["restartPolicy"] == "Always" {
                let name = self.start(pod, &init, image);
                let probe = &init["startupProbe"];
                let (period, failures) =
                    (probe["periodSeconds"].as_u64().unwrap_or(10), probe["failureThreshold"].as_u64().unwrap_or(3));
                let limit = Duration::from_secs((period * failures).min(60));
                self.wait_probe(pod, probe, limit).map_err(|e| format!("{e}\n{}", self.logs(&name)))?;
            } else {
                let out = self.run_init(pod, &init, image);
                if !out.status.success() {
                    return Err(format!("init container {} failed: {out:?}", init["name"]));
                }
            }
        }
        for app in pod.spec["spec"]["containers"].as_array().into_iter().flatten() {
            self.start(pod, app, image);
        }
        Ok(())
    }

    /// Runs `pod_app get <url>` as a client inside the pod (root, like an app's own process): its output.
    pub fn get_from(&self, pod: &Pod, url: &str) -> String {
        let network = format!("container:{}", pod.pause);
        let bin = format!("{}:/pod_app:ro", app_binary().display());
        let out = docker_run(&[
            "run",
            "--rm",
            "--network",
            &network,
            "--volume",
            &bin,
            &images().base,
            "/pod_app",
            "get",
            url,
        ]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string()
    }

    /// Runs an init container to completion: its exit status and output.
    pub fn run_init(&self, pod: &Pod, container: &Value, image: &dyn Fn(&str) -> String) -> Output {
        let args = self.container_args(pod, container, image, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_run(&args)
    }

    /// Starts a long-running container; its name.
    pub fn start(&self, pod: &Pod, container: &Value, image: &dyn Fn(&str) -> String) -> String {
        let args = self.container_args(pod, container, image, true);
        let name = args[3].clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_must(&args);
        name
    }

    /// Waits until `container`'s HTTP probe (`httpGet` on the pod's IP) answers 200-399, as the kubelet's would.
    pub fn wait_probe(&self, pod: &Pod, probe: &Value, limit: Duration) -> Result<(), String> {
        let port = probe["httpGet"]["port"].as_u64().unwrap() as u16;
        let path = probe["httpGet"]["path"].as_str().unwrap_or("/");
        let addr: std::net::SocketAddr = format!("{}:{port}", pod.ip).parse().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            let answer = super::support::http_get(addr, path);
            if answer.as_ref().is_some_and(|(s, _)| (200..400).contains(s)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{} {path} on {addr}: {answer:?}", pod.name));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The logs of a container the node started.
    pub fn logs(&self, name: &str) -> String {
        let out = docker_run(&["logs", name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let names = self.containers.lock().unwrap().clone();
        if !names.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(names.iter().map(String::as_str));
            let _ = docker_run(&args);
        }
        let _ = docker_run(&["network", "rm", &self.network]);
    }
}

/// A pod: its spec as injection wrote it, its pause container and IP, and the host files behind its volumes.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub spec: Value,
    pub pause: String,
    pub ip: String,
    pub volumes: BTreeMap<String, PathBuf>,
}

impl Pod {
    /// A container's environment as the kubelet gives it: values, downward-API fields, `$(VAR)` expanded from the
    /// variables before it.
    pub fn env(&self, container: &Value) -> Vec<(String, String)> {
        let meta = &self.spec["metadata"];
        let field = |path: &str| match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => meta["uid"].as_str().unwrap_or_default().to_string(),
            "spec.serviceAccountName" => {
                self.spec["spec"]["serviceAccountName"].as_str().unwrap_or("default").to_string()
            }
            "status.podIP" | "status.podIPs" => self.ip.clone(),
            other => panic!("{}: no downward-API value for {other}", self.name),
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_string();
            let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => env.iter().fold(v.clone(), |v, (k, val)| v.replace(&format!("$({k})"), val)),
                (_, Value::String(path)) => field(path),
                _ => String::new(),
            };
            env.push((name, value));
        }
        env
    }

    pub fn init_containers(&self) -> Vec<Value> {
        self.spec["spec"]["initContainers"].as_array().cloned().unwrap_or_default()
    }
}
