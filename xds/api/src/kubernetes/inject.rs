//! Sidecar injection: one pure transformation of a pod spec, used by `ferryctl inject` and the admission webhook.
//!
//! What a pod gets: the `ferry-init` init container (`ferry init`, NET_ADMIN and NET_RAW only), then the proxy as a
//! native sidecar (`ferry-proxy`, an init container with `restartPolicy: Always`, so it starts before the app's own
//! init containers and stops after the app), three volumes (the mesh root, an audience-bound ServiceAccount token,
//! the xtables lock), and the app's HTTP and TCP probes rewritten through the proxy's health port so they keep
//! working under strict mTLS. Objects are handled as JSON so that every field Ferry does not touch survives as it was.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value, json};

pub const INIT_CONTAINER: &str = "ferry-init";
pub const PROXY_CONTAINER: &str = "ferry-proxy";
/// The pod annotation (or namespace label, for the webhook) that turns injection on (`enabled`) or off (`disabled`).
pub const INJECT: &str = "ferry.dev/inject";
/// The label injection puts on a pod template: it marks the pod as meshed (`kubectl get pods -l ferry.dev/injected`).
pub const INJECTED_LABEL: &str = "ferry.dev/injected";
/// The proxy's variable carrying the rewritten probes (path on the health port → the app's original probe).
pub const APP_PROBES_ENV: &str = "FERRY_APP_PROBES";
/// The projected token's audience: the control plane's TokenReview asks for exactly this one.
pub const TOKEN_AUDIENCE: &str = "ferry.dev";
pub const TOKEN_PATH: &str = "/var/run/secrets/ferry.dev/serviceaccount/token";
pub const CA_ROOT_PATH: &str = "/var/run/ferry.dev/ca/root.pem";
/// The ConfigMap (in every meshed namespace) holding the mesh's trust bundle, written by the control plane.
pub const CA_ROOT_CONFIGMAP: &str = "ferry-ca-root";

const VOLUMES: [&str; 3] = ["ferry-ca-root", "ferry-token", "ferry-xtables-lock"];
const HEALTH_PORT: u16 = 15020;

/// The annotations a user can set on a pod (template) to change what is injected.
pub mod annotation {
    pub const PROXY_CPU: &str = "ferry.dev/proxy-cpu";
    pub const PROXY_MEMORY: &str = "ferry.dev/proxy-memory";
    pub const PROXY_CPU_LIMIT: &str = "ferry.dev/proxy-cpu-limit";
    pub const PROXY_MEMORY_LIMIT: &str = "ferry.dev/proxy-memory-limit";
    pub const SKIP_INBOUND_PORTS: &str = "ferry.dev/skip-inbound-ports";
    pub const SKIP_OUTBOUND_PORTS: &str = "ferry.dev/skip-outbound-ports";
    pub const SKIP_OUTBOUND_CIDRS: &str = "ferry.dev/skip-outbound-cidrs";
    pub const INCLUDE_OUTBOUND_CIDRS: &str = "ferry.dev/include-outbound-cidrs";
    pub const REWRITE_APP_PROBES: &str = "ferry.dev/rewrite-app-probes";
    pub const NATIVE_SIDECAR: &str = "ferry.dev/native-sidecar";
    pub const LOG_LEVEL: &str = "ferry.dev/proxy-log-level";
    /// Who may call the pod's ports that no Service selects (`allow`, `mesh-only`, `deny`); read by the control plane
    /// from the running pod, overriding `ferry-control --default-inbound-policy`.
    pub const DEFAULT_INBOUND_POLICY: &str = "ferry.dev/default-inbound-policy";
}

/// Cluster-wide settings of the injector (flags of `ferryctl inject`, the webhook's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub proxy_image: String,
    /// The control plane's xDS + identity address as the pods reach it.
    pub control_addr: String,
    /// The proxy as a native sidecar (Kubernetes 1.29+). Off: a regular container listed first (see the README for
    /// Jobs).
    pub native_sidecar: bool,
    pub proxy_uid: u32,
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: String,
}

/// Where injected proxies reach the control plane unless told otherwise (the Service in `deploy/`).
pub const DEFAULT_CONTROL_ADDR: &str = "ferry-control.ferry-system.svc:15010";

impl Settings {
    /// The defaults with what `ferryctl inject` and the webhook let an operator choose.
    pub fn new(proxy_image: Option<String>, control_addr: String, native_sidecar: bool) -> Settings {
        let defaults = Settings::default();
        Settings {
            proxy_image: proxy_image.unwrap_or(defaults.proxy_image.clone()),
            control_addr,
            native_sidecar,
            ..defaults
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            proxy_image: format!("ghcr.io/ferry-mesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            control_addr: DEFAULT_CONTROL_ADDR.to_string(),
            native_sidecar: true,
            proxy_uid: 1337,
            cpu_request: "100m".to_string(),
            memory_request: "64Mi".to_string(),
            cpu_limit: None,
            memory_limit: "256Mi".to_string(),
        }
    }
}

/// What injection did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// Already has Ferry's containers: left as it is (injecting twice is a no-op).
    AlreadyInjected,
    /// A pod Ferry must not or was asked not to mesh, and why.
    Skipped(String),
    /// Not a kind that has pods (a Service, a ConfigMap): passed through.
    NotAWorkload,
    /// Uninject removed Ferry's parts.
    Uninjected,
    /// Uninject found nothing of Ferry's.
    NotInjected,
}

/// An object refused, naming it and the field or annotation at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct InjectError {
    pub object: String,
    pub field: String,
    pub message: String,
}

fn error(field: &str, message: impl Into<String>) -> InjectError {
    InjectError { object: String::new(), field: field.to_string(), message: message.into() }
}

/// `Deployment default/web`, as errors and reports name an object.
pub fn describe(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap_or("object");
    let name = obj["metadata"]["name"].as_str().or(obj["metadata"]["generateName"].as_str()).unwrap_or("(unnamed)");
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Where the pod template of a kind lives (`None`: not a kind with pods).
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => {
            &["spec", "template"]
        }
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

fn at_path<'a>(obj: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(obj, |v, key| v.get_mut(*key))
}

/// Injects every pod template in `obj` (a `List`'s items one by one); the outcome of each object, in order.
pub fn inject_object(obj: &mut Value, settings: &Settings) -> Result<Vec<(String, Outcome)>, InjectError> {
    each_template(obj, &mut |template| inject_template(template, settings))
}

/// Removes what [`inject_object`] added, restoring the app's probes.
pub fn uninject_object(obj: &mut Value) -> Result<Vec<(String, Outcome)>, InjectError> {
    each_template(obj, &mut |template| Ok(uninject_template(template)))
}

fn each_template(
    obj: &mut Value,
    f: &mut dyn FnMut(&mut Value) -> Result<Outcome, InjectError>,
) -> Result<Vec<(String, Outcome)>, InjectError> {
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    if kind == "List" || kind.ends_with("List") && obj["items"].is_array() {
        let mut all = Vec::new();
        for item in obj["items"].as_array_mut().into_iter().flatten() {
            all.extend(each_template(item, f)?);
        }
        return Ok(all);
    }
    let name = describe(obj);
    let Some(path) = template_path(&kind) else { return Ok(vec![(name, Outcome::NotAWorkload)]) };
    let Some(template) = at_path(obj, path).filter(|t| t.is_object()) else {
        let field = if path.is_empty() { "spec".to_string() } else { path.join(".") };
        return Err(InjectError { object: name, field, message: "missing: no pod template".into() });
    };
    let outcome = f(template).map_err(|e| InjectError { object: name.clone(), ..e })?;
    Ok(vec![(name, outcome)])
}

fn annotations(template: &Value) -> BTreeMap<String, String> {
    template["metadata"]["annotations"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn has_container(spec: &Value, name: &str) -> bool {
    ["initContainers", "containers"]
        .iter()
        .any(|list| spec[*list].as_array().is_some_and(|l| l.iter().any(|c| c["name"] == name)))
}

/// Injects one pod template (`{metadata, spec}`), or a Pod.
pub fn inject_template(template: &mut Value, settings: &Settings) -> Result<Outcome, InjectError> {
    let notes = annotations(template);
    if let Some(v) = notes.get(INJECT)
        && matches!(v.as_str(), "disabled" | "false")
    {
        return Ok(Outcome::Skipped(format!("annotation {INJECT}: {v}")));
    }
    let spec = template.get("spec").filter(|s| s.is_object()).ok_or_else(|| error("spec", "missing"))?;
    if has_container(spec, PROXY_CONTAINER) {
        return Ok(Outcome::AlreadyInjected);
    }
    if spec["hostNetwork"] == true {
        return Ok(Outcome::Skipped(
            "uses the host's network (hostNetwork: true); its rules would be the node's".into(),
        ));
    }
    let native = match notes.get(annotation::NATIVE_SIDECAR).map(String::as_str) {
        None => settings.native_sidecar,
        Some("true") => true,
        Some("false") => false,
        Some(v) => {
            return Err(error(
                &format!("metadata.annotations[{}]", annotation::NATIVE_SIDECAR),
                format!("`{v}` must be true or false"),
            ));
        }
    };
    if let Some(v) = notes.get(annotation::DEFAULT_INBOUND_POLICY) {
        v.parse::<crate::workload::DefaultInbound>()
            .map_err(|e| error(&format!("metadata.annotations[{}]", annotation::DEFAULT_INBOUND_POLICY), e))?;
    }
    let init = init_container(settings, &notes)?;
    let rewrite = notes.get(annotation::REWRITE_APP_PROBES).map(String::as_str) != Some("false");
    let spec = template["spec"].as_object_mut().expect("checked above");
    let probes = if rewrite { rewrite_probes(spec) } else { Map::new() };
    let mut proxy = serde_json::to_value(proxy_container(settings, &notes, &probes)?).expect("a container serializes");
    if native {
        proxy["restartPolicy"] = json!("Always");
    }
    let mut inits = vec![serde_json::to_value(init).expect("a container serializes")];
    if native {
        inits.push(proxy);
    } else {
        let containers = spec.entry("containers").or_insert_with(|| json!([]));
        if let Some(list) = containers.as_array_mut() {
            list.insert(0, proxy);
        }
    }
    let existing = spec.entry("initContainers").or_insert_with(|| json!([]));
    if let Some(list) = existing.as_array_mut() {
        inits.append(list);
        *list = inits;
    }
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(list) = volumes.as_array_mut() {
        list.extend(ferry_volumes().into_iter().map(|v| serde_json::to_value(v).expect("a volume serializes")));
    }
    let metadata = template.as_object_mut().expect("a template").entry("metadata").or_insert_with(|| json!({}));
    if let Some(m) = metadata.as_object_mut() {
        let labels = m.entry("labels").or_insert_with(|| json!({}));
        if let Some(l) = labels.as_object_mut() {
            l.insert(INJECTED_LABEL.into(), json!("true"));
        }
    }
    Ok(Outcome::Injected)
}

/// Removes Ferry's containers, volumes and label from one pod template and restores the probes it rewrote.
pub fn uninject_template(template: &mut Value) -> Outcome {
    let Some(spec) = template.get_mut("spec").and_then(Value::as_object_mut) else { return Outcome::NotInjected };
    let probes = ["initContainers", "containers"]
        .iter()
        .filter_map(|list| spec.get(*list)?.as_array())
        .flatten()
        .find(|c| c["name"] == PROXY_CONTAINER)
        .and_then(|c| c["env"].as_array()?.iter().find(|e| e["name"] == APP_PROBES_ENV)?["value"].as_str())
        .and_then(|v| serde_json::from_str::<Map<String, Value>>(v).ok());
    let mut found = false;
    for list in ["initContainers", "containers"] {
        if let Some(items) = spec.get_mut(list).and_then(Value::as_array_mut) {
            let before = items.len();
            items.retain(|c| c["name"] != INIT_CONTAINER && c["name"] != PROXY_CONTAINER);
            found |= items.len() != before;
        }
    }
    if !found {
        return Outcome::NotInjected;
    }
    if let Some(items) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        items.retain(|v| !v["name"].as_str().is_some_and(|n| VOLUMES.contains(&n)));
    }
    if let Some(probes) = probes {
        restore_probes(spec, &probes);
    }
    for list in ["initContainers", "volumes"] {
        if spec.get(list).and_then(Value::as_array).is_some_and(Vec::is_empty) {
            spec.remove(list);
        }
    }
    if let Some(meta) = template.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(labels) = meta.get_mut("labels").and_then(Value::as_object_mut) {
            labels.remove(INJECTED_LABEL);
            if labels.is_empty() {
                meta.remove("labels");
            }
        }
        if meta.is_empty() {
            template.as_object_mut().expect("a template").remove("metadata");
        }
    }
    Outcome::Uninjected
}

// ===== ferry init =====

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

fn list<T>(
    notes: &BTreeMap<String, String>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<String>, InjectError> {
    let Some(v) = notes.get(key) else { return Ok(vec![]) };
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).map(|_| s.to_string()).map_err(|m| error(&annotation_field(key), m)))
        .collect()
}

fn port(s: &str) -> Result<u16, String> {
    s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{s}` is not a port (1-65535)"))
}

fn cidr(s: &str) -> Result<(), String> {
    let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
    let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if !prefix.is_empty() && prefix.parse::<u8>().ok().is_none_or(|p| p > max) {
        return Err(format!("`{s}`: prefix must be 0-{max}"));
    }
    Ok(())
}

/// The exact arguments of the `ferry init` step for a pod with these annotations (after the `init` subcommand).
pub fn init_args(proxy_uid: u32, notes: &BTreeMap<String, String>) -> Result<Vec<String>, InjectError> {
    let mut args: Vec<String> = ["init", "--proxy-uid", &proxy_uid.to_string()].map(String::from).to_vec();
    args.extend(["--inbound-port", "15006", "--outbound-port", "15001", "--health-port", "15020"].map(String::from));
    for (flag, values) in [
        ("--exclude-inbound-ports", list(notes, annotation::SKIP_INBOUND_PORTS, port)?),
        ("--exclude-outbound-ports", list(notes, annotation::SKIP_OUTBOUND_PORTS, port)?),
        ("--exclude-outbound-cidrs", list(notes, annotation::SKIP_OUTBOUND_CIDRS, cidr)?),
        ("--include-outbound-cidrs", list(notes, annotation::INCLUDE_OUTBOUND_CIDRS, cidr)?),
    ] {
        if !values.is_empty() {
            args.push(format!("{flag}={}", values.join(",")));
        }
    }
    Ok(args)
}

fn init_container(settings: &Settings, notes: &BTreeMap<String, String>) -> Result<Container, InjectError> {
    let small = |cpu: &str, mem: &str| {
        BTreeMap::from([("cpu".into(), Quantity(cpu.into())), ("memory".into(), Quantity(mem.into()))])
    };
    Ok(Container {
        name: INIT_CONTAINER.into(),
        image: Some(settings.proxy_image.clone()),
        args: Some(init_args(settings.proxy_uid, notes)?),
        // iptables takes its lock under /run; the root filesystem stays read-only.
        volume_mounts: Some(vec![VolumeMount {
            name: "ferry-xtables-lock".into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(small("10m", "10Mi")),
            limits: Some(small("100m", "32Mi")),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            // Root inside the pod's own network namespace only, to write its nat table.
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

// ===== the proxy =====

/// A Kubernetes resource quantity (`100m`, `1.5`, `64Mi`, `1e3`), as the API server would accept it.
fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = ["", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"].contains(&suffix)
        || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
        });
    number_ok && suffix_ok
}

fn resources(settings: &Settings, notes: &BTreeMap<String, String>) -> Result<ResourceRequirements, InjectError> {
    let pick = |key: &str, default: Option<&String>| -> Result<Option<Quantity>, InjectError> {
        match notes.get(key) {
            Some(v) if is_quantity(v) => Ok(Some(Quantity(v.clone()))),
            Some(v) => Err(error(&annotation_field(key), format!("`{v}` is not a quantity (e.g. 100m, 0.5, 128Mi)"))),
            None => Ok(default.cloned().map(Quantity)),
        }
    };
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (is_limit, name, key, default) in [
        (false, "cpu", annotation::PROXY_CPU, Some(&settings.cpu_request)),
        (false, "memory", annotation::PROXY_MEMORY, Some(&settings.memory_request)),
        (true, "cpu", annotation::PROXY_CPU_LIMIT, settings.cpu_limit.as_ref()),
        (true, "memory", annotation::PROXY_MEMORY_LIMIT, Some(&settings.memory_limit)),
    ] {
        if let Some(q) = pick(key, default)? {
            if is_limit { &mut limits } else { &mut requests }.insert(name.to_string(), q);
        }
    }
    Ok(ResourceRequirements { requests: Some(requests), limits: Some(limits), ..Default::default() })
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

fn health_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HEALTH_PORT.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn proxy_container(
    settings: &Settings,
    notes: &BTreeMap<String, String>,
    probes: &Map<String, Value>,
) -> Result<Container, InjectError> {
    let mut vars = vec![
        field_env("FERRY_NAMESPACE", "metadata.namespace"),
        field_env("FERRY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("FERRY_POD_NAME", "metadata.name"),
        field_env("FERRY_POD_IP", "status.podIP"),
        env("FERRY_NODE_ID", "$(FERRY_POD_NAME).$(FERRY_NAMESPACE)"),
        env("FERRY_CONTROL_ADDR", settings.control_addr.clone()),
        env("FERRY_CA_ROOT", CA_ROOT_PATH),
        env("FERRY_SERVICE_ACCOUNT_TOKEN", TOKEN_PATH),
        env("FERRY_LOG_FORMAT", "json"),
    ];
    if let Some(level) = notes.get(annotation::LOG_LEVEL) {
        vars.push(env("FERRY_LOG_LEVEL", level.clone()));
    }
    if !probes.is_empty() {
        vars.push(env(APP_PROBES_ENV, Value::Object(probes.clone()).to_string()));
    }
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    Ok(Container {
        name: PROXY_CONTAINER.into(),
        image: Some(settings.proxy_image.clone()),
        args: Some(vec!["run".into()]),
        env: Some(vars),
        ports: Some(vec![
            ContainerPort {
                name: Some("ferry-health".into()),
                container_port: HEALTH_PORT.into(),
                ..Default::default()
            },
            ContainerPort { name: Some("ferry-inbound".into()), container_port: 15006, ..Default::default() },
        ]),
        startup_probe: Some(health_probe("/health/startup", 1, 120)),
        readiness_probe: Some(health_probe("/health/ready", 2, 3)),
        liveness_probe: Some(health_probe("/health/live", 10, 3)),
        resources: Some(resources(settings, notes)?),
        security_context: Some(SecurityContext {
            run_as_user: Some(settings.proxy_uid.into()),
            run_as_group: Some(settings.proxy_uid.into()),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("ferry-ca-root", "/var/run/ferry.dev/ca"),
            mount("ferry-token", "/var/run/secrets/ferry.dev/serviceaccount"),
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    })
}

fn ferry_volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: "ferry-ca-root".into(),
            config_map: Some(ConfigMapVolumeSource { name: CA_ROOT_CONFIGMAP.into(), ..Default::default() }),
            ..Default::default()
        },
        Volume {
            name: "ferry-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "ferry-xtables-lock".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ]
}

// ===== the app's probes =====

const PROBES: [(&str, &str); 3] = [("livenessProbe", "live"), ("readinessProbe", "ready"), ("startupProbe", "startup")];

/// The number behind a probe's `port` (a number, a numeric string, or the name of one of the container's ports).
fn resolve_port(container: &Value, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.parse().ok().or_else(|| {
            container["ports"].as_array()?.iter().find(|p| p["name"] == *s)?["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
        }),
        _ => None,
    }
}

/// Rewrites the HTTP (plain) and TCP probes of the app's containers (and of its own native sidecars) to
/// `GET :15020/app-health/<container>/<live|ready|startup>`, which the proxy answers by probing the app itself over
/// loopback. Returns what was rewritten: path → `{"httpGet"|"tcpSocket": original, "port": number}`.
fn rewrite_probes(spec: &mut Map<String, Value>) -> Map<String, Value> {
    let mut rewritten = Map::new();
    let mut containers: Vec<&mut Value> = Vec::new();
    for (list, items) in spec.iter_mut() {
        let Some(items) = items.as_array_mut() else { continue };
        match list.as_str() {
            "initContainers" => containers.extend(items.iter_mut().filter(|c| c["restartPolicy"] == "Always")),
            "containers" => containers.extend(items.iter_mut()),
            _ => {}
        }
    }
    for container in containers {
        let Some(name) = container["name"].as_str().map(str::to_string) else { continue };
        for (field, kind) in PROBES {
            let probe = &container[field];
            let (action, original) = if let Some(get) = probe.get("httpGet") {
                let scheme_ok = get["scheme"].as_str().is_none_or(|s| s.eq_ignore_ascii_case("http"));
                if !scheme_ok || get.get("host").is_some() {
                    continue;
                }
                ("httpGet", get.clone())
            } else if let Some(tcp) = probe.get("tcpSocket") {
                if tcp.get("host").is_some() {
                    continue;
                }
                ("tcpSocket", tcp.clone())
            } else {
                continue;
            };
            let Some(port) = resolve_port(container, &original["port"]) else { continue };
            let path = format!("/app-health/{name}/{kind}");
            let probe = container[field].as_object_mut().expect("a probe");
            probe.remove(action);
            probe.insert("httpGet".into(), json!({"path": path, "port": HEALTH_PORT}));
            rewritten.insert(path, json!({ action: original, "port": port }));
        }
    }
    rewritten
}

fn restore_probes(spec: &mut Map<String, Value>, rewritten: &Map<String, Value>) {
    for list in ["initContainers", "containers"] {
        for container in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(name) = container["name"].as_str().map(str::to_string) else { continue };
            for (field, kind) in PROBES {
                let Some(original) = rewritten.get(&format!("/app-health/{name}/{kind}")) else { continue };
                let Some(probe) = container.get_mut(field).and_then(Value::as_object_mut) else { continue };
                probe.remove("httpGet");
                for action in ["httpGet", "tcpSocket"] {
                    if let Some(v) = original.get(action) {
                        probe.insert(action.into(), v.clone());
                    }
                }
            }
        }
    }
}

// ===== multi-document YAML =====

/// A report line per object: what happened to it.
pub type Report = Vec<(String, Outcome)>;

fn documents(yaml: &str) -> Result<Vec<Value>, InjectError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| InjectError {
        object: "input".into(),
        field: "YAML".into(),
        message: e.to_string(),
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn render(docs: &[Value]) -> String {
    let mut out = String::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(doc).expect("JSON values serialize"));
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// `ferryctl inject`: every object of a multi-document YAML (or JSON) stream, objects without pods passed through.
pub fn inject_yaml(yaml: &str, settings: &Settings) -> Result<(String, Report), InjectError> {
    let mut docs = documents(yaml)?;
    let mut report = Vec::new();
    for doc in &mut docs {
        report.extend(inject_object(doc, settings)?);
    }
    Ok((render(&docs), report))
}

/// `ferryctl uninject`.
pub fn uninject_yaml(yaml: &str) -> Result<(String, Report), InjectError> {
    let mut docs = documents(yaml)?;
    let mut report = Vec::new();
    for doc in &mut docs {
        report.extend(uninject_object(doc)?);
    }
    Ok((render(&docs), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["100m", "1", "0.5", "128Mi", "1Gi", "1e3", "2k", "1.5G"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "lots", "1.2.3", "10MB", "-1", "1e", "m"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn init_args_from_annotations() {
        let notes = BTreeMap::from([
            (annotation::SKIP_INBOUND_PORTS.to_string(), "9090, 9091".to_string()),
            (annotation::SKIP_OUTBOUND_CIDRS.to_string(), "169.254.169.254/32,fd00::/8".to_string()),
        ]);
        let args = init_args(1337, &notes).unwrap();
        assert_eq!(args[..3], ["init", "--proxy-uid", "1337"]);
        assert!(args.contains(&"--exclude-inbound-ports=9090,9091".to_string()), "{args:?}");
        assert!(args.contains(&"--exclude-outbound-cidrs=169.254.169.254/32,fd00::/8".to_string()), "{args:?}");
        for (key, value, want) in [
            (annotation::SKIP_INBOUND_PORTS, "http", "`http` is not a port"),
            (annotation::SKIP_OUTBOUND_PORTS, "0", "`0` is not a port"),
            (annotation::SKIP_OUTBOUND_CIDRS, "10.0.0.0/33", "prefix must be 0-32"),
            (annotation::INCLUDE_OUTBOUND_CIDRS, "cluster", "not an IP address or CIDR"),
        ] {
            let notes = BTreeMap::from([(key.to_string(), value.to_string())]);
            let err = init_args(1337, &notes).unwrap_err().to_string();
            assert!(err.contains(&format!("metadata.annotations[{key}]")) && err.contains(want), "{err}");
        }
    }

    #[test]
    fn probes_resolve_named_ports_and_skip_what_they_cannot_proxy() {
        let mut spec = json!({"containers": [{
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
            "readinessProbe": {"tcpSocket": {"port": 8080}},
            "startupProbe": {"httpGet": {"path": "/", "port": 8443, "scheme": "HTTPS"}},
        }, {
            "name": "worker",
            "livenessProbe": {"exec": {"command": ["true"]}},
            "readinessProbe": {"grpc": {"port": 9000}},
        }]});
        let before = spec.clone();
        let spec = spec.as_object_mut().unwrap();
        let rewritten = rewrite_probes(spec);
        assert_eq!(rewritten.len(), 2, "{rewritten:?}");
        assert_eq!(rewritten["/app-health/web/live"]["port"], 8080);
        let web = &spec["containers"][0];
        assert_eq!(
            web["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/live", "port": 15020}, "periodSeconds": 5})
        );
        assert_eq!(web["readinessProbe"]["httpGet"]["path"], "/app-health/web/ready");
        assert_eq!(web["startupProbe"], before["containers"][0]["startupProbe"], "HTTPS probes are left alone");
        assert_eq!(spec["containers"][1], before["containers"][1], "exec and gRPC probes are left alone");
        restore_probes(spec, &rewritten);
        assert_eq!(Value::Object(spec.clone()), before);
    }
}
