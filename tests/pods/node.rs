//! A small test "node" for the `pods` suite: it does for the suite's pods what the kubelet (with a Docker runtime, as
//! dockershim did), kube-proxy and the endpoint-slice controller do, from each pod's spec exactly as injection wrote it.
//!
//! - **Pods**: a pause container holds the pod's network namespace on a Docker network of the node's own
//!   (198.19.<k>.0/24, internal: nothing leaves the machine, nothing is SNATed; the host is the gateway `.1`, where the
//!   tests' `ferry-control` listens, and the route to the Services' ClusterIPs, [`SERVICE_CIDR`]); every container
//!   of the spec joins it, with the spec's image, command, args,
//!   user, capabilities, read-only root, `no-new-privileges`, Docker's default seccomp profile (`RuntimeDefault`), env
//!   (downward-API fields resolved, `$(VAR)` expanded) and volumes (emptyDirs as tmpfs, the projected token and the
//!   `ferry-ca-root` ConfigMap as files the test provides). The Pod object (phase, pod IP, the `Ready` condition) is
//!   written to the fake API server.
//! - **Start order**: init containers in order, each to completion; a native sidecar (an init container with
//!   `restartPolicy: Always`) is started and its startup probe waited for before anything after it starts; then the
//!   app containers (image [`APP_IMAGE`]: the tests' own `pod_app` on the base image).
//! - **Probes and readiness**: readiness probes of every container (the rewritten `/app-health/...` ones included)
//!   run from the host on the pod's IP, as the kubelet's do, every `periodSeconds` (at most 1 s here) with the spec's
//!   failure threshold; the pod is ready when all pass.
//! - **Services**: the EndpointSlices the endpoint-slice controller would write (`ready`, `serving`, `terminating`;
//!   named ports resolved per pod), ClusterIP → pod DNAT rules in a chain of the node as kube-proxy writes them
//!   (random choice among ready endpoints, terminating-but-serving ones when none is ready), and `/etc/hosts` in each
//!   pod resolving Service names (`<svc>.<ns>`, `<svc>.<ns>.svc`, `.svc.cluster.local`, and `<svc>` in its own
//!   namespace; a headless Service to its ready endpoints' first IP) as cluster DNS would.
//! - **Deletion** in the kubelet's order: the pod marked deleted and its endpoints terminating, SIGTERM to the app
//!   containers, the native sidecars after the apps have exited (in reverse order), SIGKILL at the end of the grace
//!   period; a pod whose app containers all exit (a Job's) has its sidecars stopped after them.
//!
//! What it does not model: scheduling and more than one node, cgroup limits (requests and limits are ignored), image
//! pulls (the images are built locally from `deploy/Dockerfile`), restarts of failed containers, liveness-probe
//! kills, exec and TCP probes, preStop hooks, DNS search paths (only `/etc/hosts`), NodePorts and session affinity.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::apiserver::{ApiServer, PODS, SERVICES, SLICES};
use probes::{probe_all, probe_target, readiness_probes};
use services::{iptables, iptables_must, sync};

mod probes;
mod services;

/// The image name a test spec gives its app containers: the node runs them as the tests' own `pod_app` binary
/// (`examples/pod_app.rs`, built with the tests) on the base image.
pub const APP_IMAGE: &str = "ferry-test/app:1";

/// The Service ClusterIP range the tests' Services take their addresses from (Kubernetes' default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

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

/// The node: a Docker network of its own and a NAT chain on the host; every container it started is removed, and
/// the chain with it, when it is dropped.
pub struct Node {
    pub network: String,
    /// `198.19.<k>`: pods get `.<n>`, the host side (the network's gateway) `.1`.
    pub prefix: String,
    containers: Mutex<Vec<String>>,
    pub dir: super::support::TempDir,
    /// kube-proxy's rules for this node's pods: the chain in the host's `nat` table its pods' traffic goes through.
    chain: String,
    cluster: Arc<Mutex<Cluster>>,
    stop: Arc<AtomicBool>,
    prober: Option<std::thread::JoinHandle<()>>,
}

/// What the node's kubelet, kube-proxy and endpoint-slice controller act on.
#[derive(Default)]
struct Cluster {
    api: Option<ApiServer>,
    /// Names every pod's `/etc/hosts` resolves besides Services' (the control plane on the gateway).
    hosts: Vec<(String, String)>,
    services: Vec<Value>,
    pods: BTreeMap<String, Member>,
    /// What was last written (slices, Pod objects, rules), so only changes are written.
    written: BTreeMap<String, Value>,
}

/// A pod as the node tracks it.
struct Member {
    namespace: String,
    uid: String,
    ip: String,
    spec: Value,
    hosts_path: PathBuf,
    /// Readiness probes: (address, path, period, failure threshold) and their state (passing, consecutive failures).
    probes: Vec<(SocketAddr, String, Duration, u32)>,
    state: Vec<(bool, u32, Instant)>,
    running: bool,
    terminating: bool,
}

impl Member {
    fn ready(&self) -> bool {
        self.running && self.state.iter().all(|(passing, ..)| *passing)
    }
}

impl Node {
    pub fn new(tag: &str) -> Node {
        // Each node of this process its own subnet (tests run in parallel), apart from other processes' as far as
        // 50 of them go.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = ((std::process::id() % 50) * 5 + NEXT.fetch_add(1, Ordering::Relaxed) % 5) % 250 + 1;
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
        // kube-proxy's DNAT needs the replies, bridged from pod to pod, to pass conntrack (as on every Kubernetes
        // node with a bridge CNI).
        let sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables";
        if std::fs::read_to_string(sysctl).is_ok_and(|v| v.trim() == "0") {
            let _ = std::fs::write(sysctl, "1");
        }
        let bridged = std::fs::read_to_string(sysctl).unwrap_or_default();
        assert_eq!(bridged.trim(), "1", "the node needs br_netfilter with net.bridge.bridge-nf-call-iptables=1");
        let chain = format!("FERRY-NODE-{k}");
        let source = format!("{prefix}.0/24");
        Self::remove_chain(&chain, &source);
        iptables_must(&["-t", "nat", "-N", &chain]);
        iptables_must(&["-t", "nat", "-I", "PREROUTING", "-s", &source, "-j", &chain]);
        Node {
            network,
            prefix,
            containers: Mutex::new(Vec::new()),
            dir: super::support::TempDir::new(&format!("pods-{tag}")),
            chain,
            cluster: Arc::default(),
            stop: Arc::default(),
            prober: None,
        }
    }

    fn remove_chain(chain: &str, source: &str) {
        while iptables(&["-t", "nat", "-D", "PREROUTING", "-s", source, "-j", chain]).status.success() {}
        let _ = iptables(&["-t", "nat", "-F", chain]);
        let _ = iptables(&["-t", "nat", "-X", chain]);
    }

    /// Joins the node to a (fake) API server: from now on it writes Pod objects, EndpointSlices and the Services'
    /// rules, and probes its pods' readiness. `hosts`: names every pod resolves besides Services (name, IP).
    pub fn attach(&mut self, api: &ApiServer, hosts: &[(&str, &str)]) {
        {
            let mut cluster = self.cluster.lock().unwrap();
            cluster.api = Some(api.clone());
            cluster.hosts = hosts.iter().map(|(n, ip)| (n.to_string(), ip.to_string())).collect();
        }
        let (cluster, stop, chain) = (self.cluster.clone(), self.stop.clone(), self.chain.clone());
        self.prober = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if probe_all(&cluster) {
                    sync(&mut cluster.lock().unwrap(), &chain);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }

    /// Creates (or replaces) a Service in the API server; its slices, rules and names follow.
    pub fn service(&self, service: Value) {
        let mut cluster = self.cluster.lock().unwrap();
        let key = |s: &Value| (s["metadata"]["namespace"].clone(), s["metadata"]["name"].clone());
        cluster.services.retain(|s| key(s) != key(&service));
        cluster.services.push(service.clone());
        cluster.api.as_ref().expect("attached").apply(SERVICES, service);
        sync(&mut cluster, &self.chain);
    }

    fn track(&self, name: &str) {
        self.containers.lock().unwrap().push(name.to_string());
    }

    /// Starts the pause container of pod `pod` at `<prefix>.<n>` and returns the pod with its `spec` (the namespace
    /// is the spec's) and `volumes`; its containers are yet to run. Attached, the node writes its Pod object (pending).
    pub fn pod(&self, pod: &str, n: u8, spec: Value, volumes: BTreeMap<String, PathBuf>) -> Pod {
        let name = format!("{}-{pod}", self.network);
        let ip = format!("{}.{n}", self.prefix);
        docker_must(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &self.network,
            "--ip",
            &ip,
            "--hostname",
            pod,
            &images().base,
            "sleep",
            "infinity",
        ]);
        self.track(&name);
        // Docker gives a container on an internal network a default route only up to Engine 24 (25 and later give
        // none); ClusterIPs are reached through the node (the host, `.1`) either way, as on a Kubernetes node.
        let pid = docker_must(&["inspect", "--format", "{{.State.Pid}}", &name]);
        let route = Command::new("nsenter")
            .args(["-t", &pid, "-n", "ip", "route", "replace", SERVICE_CIDR, "via", &format!("{}.1", self.prefix)])
            .output()
            .expect("nsenter");
        assert!(route.status.success(), "route to the Services in {name}: {}", String::from_utf8_lossy(&route.stderr));
        let namespace = spec["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let hosts_path = PathBuf::from(docker_must(&["inspect", "--format", "{{.HostsPath}}", &name]));
        let member = Member {
            namespace: namespace.clone(),
            uid: spec["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
            ip: ip.clone(),
            spec: spec.clone(),
            hosts_path,
            probes: Vec::new(),
            state: Vec::new(),
            running: false,
            terminating: false,
        };
        let mut cluster = self.cluster.lock().unwrap();
        cluster.pods.insert(pod.to_string(), member);
        sync(&mut cluster, &self.chain);
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
        let mut cluster = self.cluster.lock().unwrap();
        if let Some(member) = cluster.pods.get_mut(&pod.name) {
            member.probes = readiness_probes(pod);
            member.state = vec![(false, 0, Instant::now()); member.probes.len()];
            member.running = true;
        }
        sync(&mut cluster, &self.chain);
        Ok(())
    }

    /// Whether the node counts `pod` ready (every readiness probe passing).
    pub fn ready(&self, pod: &Pod) -> bool {
        self.cluster.lock().unwrap().pods.get(&pod.name).is_some_and(Member::ready)
    }

    /// Waits (up to `limit`) until the node counts `pod` ready.
    pub fn wait_ready(&self, pod: &Pod, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while !self.ready(pod) {
            if Instant::now() > deadline {
                let (sidecars, apps) = self.container_names(pod);
                let logs: Vec<String> = sidecars.iter().chain(&apps).map(|c| self.logs(c)).collect();
                return Err(format!("{} not ready after {limit:?}\n{}", pod.name, logs.join("\n---\n")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The node's names of a pod's containers: the native sidecars (in spec order), then the app containers.
    pub fn container_names(&self, pod: &Pod) -> (Vec<String>, Vec<String>) {
        let name = |c: &Value| format!("{}-{}-{}", self.network, pod.name, c["name"].as_str().unwrap());
        let sidecars = pod.init_containers().iter().filter(|c| c["restartPolicy"] == "Always").map(name).collect();
        let apps = pod.spec["spec"]["containers"].as_array().into_iter().flatten().map(name).collect();
        (sidecars, apps)
    }

    /// Deletes a pod as the API server, the endpoint-slice controller and the kubelet do, in their order: the Pod
    /// marked deleted and its endpoints terminating (not ready, serving while it still passes its probes); SIGTERM to
    /// the app containers; once they have exited, SIGTERM to the native sidecars, last first; SIGKILL to whatever
    /// still runs when `grace` is over; then the Pod object removed. What each container did, in order of exit.
    pub fn delete(&self, pod: &Pod, grace: Duration) -> Vec<Exit> {
        let deadline = Instant::now() + grace;
        {
            let mut cluster = self.cluster.lock().unwrap();
            if let Some(member) = cluster.pods.get_mut(&pod.name) {
                member.terminating = true;
            }
            sync(&mut cluster, &self.chain);
        }
        let (sidecars, apps) = self.container_names(pod);
        self.stop_containers(&apps, deadline);
        self.stop_containers(&sidecars.iter().rev().cloned().collect::<Vec<_>>(), deadline);
        self.delete_object(pod);
        exits(&[apps, sidecars].concat())
    }

    /// Runs a pod whose app containers end by themselves (a Job's): starts it, waits (up to `limit`) for every app
    /// container to exit, then stops the native sidecars as the kubelet does. What each container did, in order of
    /// exit.
    pub fn run_to_completion(
        &self,
        pod: &Pod,
        image: &dyn Fn(&str) -> String,
        limit: Duration,
    ) -> Result<Vec<Exit>, String> {
        self.run_pod(pod, image)?;
        let deadline = Instant::now() + limit;
        let (sidecars, apps) = self.container_names(pod);
        for app in &apps {
            self.wait_exit(app, deadline.saturating_duration_since(Instant::now()))?;
        }
        self.stop_containers(&sidecars.iter().rev().cloned().collect::<Vec<_>>(), Instant::now() + limit);
        self.delete_object(pod);
        Ok(exits(&[apps, sidecars].concat()))
    }

    /// SIGTERM to each container, SIGKILL at `deadline` (Docker's stop timeout, in whole seconds).
    fn stop_containers(&self, names: &[String], deadline: Instant) {
        for name in names {
            let left = deadline.saturating_duration_since(Instant::now()).as_secs().to_string();
            let _ = docker_run(&["stop", "--time", &left, name]);
        }
    }

    /// The API server forgets the pod (its object deleted) while its containers still run, as for a node cut off
    /// from the API server; the node no longer writes or selects it. [`Node::delete`] ends with this.
    pub fn delete_object(&self, pod: &Pod) {
        let mut cluster = self.cluster.lock().unwrap();
        cluster.pods.remove(&pod.name);
        if let Some(api) = &cluster.api {
            api.delete(PODS, &pod.namespace, &pod.name);
        }
        cluster.written.remove(&format!("pod/{}/{}", pod.namespace, pod.name));
        sync(&mut cluster, &self.chain);
    }

    /// Runs `pod_app get <url>` as a client inside the pod (root, like an app's own process): its output.
    pub fn get_from(&self, pod: &Pod, url: &str) -> String {
        self.client(pod, &["get", url])
    }

    /// Runs `pod_app <args>` (a client: get, grpc, ws, tcp) inside the pod: its output.
    pub fn client(&self, pod: &Pod, args: &[&str]) -> String {
        let run = client_run(pod, &["--rm"], args);
        let out = docker_run(&run.iter().map(String::as_str).collect::<Vec<_>>());
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string()
    }

    /// Starts `pod_app <args>` (a client: get, grpc, ws, tcp, load) inside the pod in the background, as container
    /// `name` of the node (removed with it); see [`Node::wait_exit`] and [`Node::logs`].
    pub fn spawn_client(&self, pod: &Pod, name: &str, args: &[&str]) -> String {
        let name = format!("{}-{name}", self.network);
        let run = client_run(pod, &["-d", "--name", &name], args);
        docker_must(&run.iter().map(String::as_str).collect::<Vec<_>>());
        self.track(&name);
        name
    }

    /// Waits (up to `limit`) until a container of the node has exited: its exit code.
    pub fn wait_exit(&self, name: &str, limit: Duration) -> Result<i64, String> {
        let deadline = Instant::now() + limit;
        loop {
            let state = docker_must(&["inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name]);
            if let Some(code) = state.strip_prefix("false ") {
                return code.parse().map_err(|e| format!("{name}: exit code {code}: {e}"));
            }
            if Instant::now() > deadline {
                return Err(format!("{name} still runs after {limit:?}: {}", self.logs(name)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// Waits until a container's HTTP probe (`httpGet` on the pod's IP) answers 200-399, as the kubelet's would.
    pub fn wait_probe(&self, pod: &Pod, probe: &Value, limit: Duration) -> Result<(), String> {
        let (addr, path) = probe_target(pod.ip.as_str(), &Value::Null, probe);
        let deadline = Instant::now() + limit;
        loop {
            let answer = super::support::http_get(addr, &path);
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
        self.stop.store(true, Ordering::Relaxed);
        if let Some(prober) = self.prober.take() {
            let _ = prober.join();
        }
        Self::remove_chain(&self.chain, &format!("{}.0/24", self.prefix));
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

/// How a container ended: its name, exit code and when it finished (UTC, a text that sorts in time order).
#[derive(Debug, Clone)]
pub struct Exit {
    pub name: String,
    pub code: i64,
    pub finished: String,
}

/// `docker run <how> ... /pod_app <args>`: the tests' client in the pod's network namespace, on the base image.
fn client_run(pod: &Pod, how: &[&str], args: &[&str]) -> Vec<String> {
    let mut run: Vec<String> = vec!["run".into()];
    run.extend(how.iter().map(|a| a.to_string()));
    run.extend(["--network".into(), format!("container:{}", pod.pause)]);
    run.extend(["--volume".into(), format!("{}:/pod_app:ro", app_binary().display())]);
    run.extend([images().base.clone(), "/pod_app".into()]);
    run.extend(args.iter().map(|a| a.to_string()));
    run
}

/// The containers' exits, in the order they happened. A container still running is an error, never an exit.
fn exits(names: &[String]) -> Vec<Exit> {
    let mut exits: Vec<Exit> = names
        .iter()
        .map(|name| {
            let format = "{{.State.Running}} {{.State.ExitCode}} {{.State.FinishedAt}}";
            let state = docker_must(&["inspect", "--format", format, name]);
            let mut fields = state.split(' ');
            assert_eq!(fields.next(), Some("false"), "{name} still runs: {state}");
            let code = fields.next().and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{name}: {state}"));
            let finished = fields.next().map(sortable_time).unwrap_or_else(|| panic!("{name}: {state}"));
            Exit { name: name.clone(), code, finished }
        })
        .collect();
    exits.sort_by(|a, b| a.finished.cmp(&b.finished));
    exits
}

/// Docker's RFC 3339 time (UTC, its fraction of a second with trailing zeros cut) with the fraction padded to nine
/// digits, so that times sort as text.
fn sortable_time(time: &str) -> String {
    let time = time.trim_end_matches('Z');
    let (seconds, fraction) = time.split_once('.').unwrap_or((time, ""));
    format!("{seconds}.{fraction:0<9}Z")
}

#[cfg(test)]
mod tests {
    use super::sortable_time;

    #[test]
    fn docker_times_sort_in_time_order() {
        let times = [
            "2026-12-03T04:00:05.12Z",
            "2026-12-03T04:00:05.1Z",
            "2026-12-03T04:00:05Z",
            "2026-12-03T04:00:04.999999999Z",
        ];
        let mut sorted: Vec<String> = times.iter().map(|t| sortable_time(t)).collect();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "2026-12-03T04:00:04.999999999Z",
                "2026-12-03T04:00:05.000000000Z",
                "2026-12-03T04:00:05.100000000Z",
                "2026-12-03T04:00:05.120000000Z"
            ]
        );
    }
}
