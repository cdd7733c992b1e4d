//! `ferryctl` in Kubernetes mode: policies written as CRD objects through the API server with the user's kubeconfig
//! (server-side apply), and what `status` and `check` read there (control-plane replicas through `pods/portforward`).

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::Value;

use ferry_api::config::Document;
use ferry_api::kubernetes::{CA_SECRET, WEBHOOK_CONFIGURATION};
use ferry_api::policy::{AuthorizationPolicyResource, TrafficPolicyResource};

/// The field manager of `ferryctl apply`.
const MANAGER: &str = "ferryctl";
/// The label selecting the control plane's pods (and its Deployment's name).
pub const CONTROL_PLANE: &str = "ferry-control";

/// A client from the user's kubeconfig (or the pod's service account inside a cluster).
pub async fn client() -> anyhow::Result<Client> {
    use anyhow::Context;
    Client::try_default()
        .await
        .context("no Kubernetes API server configured (KUBECONFIG, ~/.kube/config, or in-cluster)")
}

fn object(doc: &Document) -> anyhow::Result<Value> {
    match doc {
        Document::Service(s) => anyhow::bail!(
            "Service {}/{}: in Kubernetes mode Services come from the cluster (kubectl apply the Kubernetes Service)",
            s.metadata.namespace,
            s.metadata.name
        ),
        Document::HttpRoute(_) | Document::GrpcRoute(_) | Document::ReferenceGrant(_) => anyhow::bail!(
            "{}: in Kubernetes mode Gateway API objects are applied with kubectl (ferryctl writes Ferry's CRDs)",
            doc.display_name()
        ),
        _ => {}
    }
    let mut json = ferry_api::document_json(doc);
    if let Some(meta) = json["metadata"].as_object_mut() {
        meta.retain(|k, _| k == "name" || k == "namespace" || k == "labels");
    }
    Ok(json)
}

/// Server-side applies each policy (validated beforehand by the caller with the control plane's rules); one line per
/// object, as `kubectl apply` prints them.
pub async fn apply(client: &Client, docs: &[Document], dry_run: bool) -> anyhow::Result<Vec<String>> {
    let objects: Vec<(&Document, Value)> = docs.iter().map(|d| Ok((d, object(d)?))).collect::<anyhow::Result<_>>()?;
    let mut params = PatchParams::apply(MANAGER).force();
    params.dry_run = dry_run;
    let mut lines = Vec::new();
    for (doc, json) in objects {
        let meta = doc.metadata();
        let patch = Patch::Apply(&json);
        let resource_version = match doc {
            Document::TrafficPolicy(_) => Api::<TrafficPolicyResource>::namespaced(client.clone(), &meta.namespace)
                .patch(&meta.name, &params, &patch)
                .await?
                .resource_version(),
            _ => Api::<AuthorizationPolicyResource>::namespaced(client.clone(), &meta.namespace)
                .patch(&meta.name, &params, &patch)
                .await?
                .resource_version(),
        };
        let suffix = if dry_run { " (server dry run)" } else { "" };
        lines.push(format!(
            "{}.ferry.dev/{} serverside-applied (resourceVersion {}){suffix}",
            doc.kind().to_ascii_lowercase(),
            meta.name,
            resource_version.unwrap_or_default()
        ));
    }
    Ok(lines)
}

pub async fn delete(client: &Client, kind: &str, namespace: &str, name: &str) -> anyhow::Result<()> {
    let params = DeleteParams::default();
    match kind {
        "TrafficPolicy" => {
            Api::<TrafficPolicyResource>::namespaced(client.clone(), namespace).delete(name, &params).await?;
        }
        "AuthorizationPolicy" => {
            Api::<AuthorizationPolicyResource>::namespaced(client.clone(), namespace).delete(name, &params).await?;
        }
        other => {
            anyhow::bail!("{other}: in Kubernetes mode only policies are deleted with ferryctl (kubectl for the rest)")
        }
    }
    Ok(())
}

/// The port of a control-plane replica's read-only `/v1/status` in Kubernetes mode: its API address, which listens on
/// the pod's loopback only.
pub const STATUS_PORT: u16 = 15011;

/// The control plane's pods, and each one's `/v1/status` (the proxies connected to it), read through
/// `pods/portforward` to the replica's loopback: the caller's own RBAC decides, as for `kubectl port-forward`.
pub async fn replicas(client: &Client, namespace: &str) -> anyhow::Result<Vec<(String, Result<Value, String>)>> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/name={CONTROL_PLANE}"))).await?;
    let mut out = Vec::new();
    for pod in list {
        let name = pod.name_any();
        let status = match forwarded_status(&pods, &name).await {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("unreadable /v1/status: {e}")),
            Err(e) => Err(format!("{e:#}")),
        };
        out.push((name, status));
    }
    Ok(out)
}

/// `GET /v1/status` over a port-forward to `pod`'s [`STATUS_PORT`], bounded in time.
async fn forwarded_status(pods: &Api<Pod>, pod: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use http_body_util::BodyExt;
    let exchange = async {
        let mut forward = pods.portforward(pod, &[STATUS_PORT]).await.context("pods/portforward")?;
        let stream = forward.take_stream(STATUS_PORT).context("no stream for the forwarded port")?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let request = http::Request::get("/v1/status")
            .header(http::header::HOST, format!("localhost:{STATUS_PORT}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = sender.send_request(request).await.context("the forwarded request")?;
        let code = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        connection.abort();
        forward.abort();
        let text = String::from_utf8_lossy(&body).into_owned();
        anyhow::ensure!(code.is_success(), "/v1/status answered {code}: {}", text.trim());
        Ok(text)
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")))
}

/// Every connected proxy across the replicas (`ferryctl status` in Kubernetes mode).
pub async fn status(client: &Client, namespace: &str) -> anyhow::Result<Value> {
    let mut proxies = Vec::new();
    for (replica, status) in replicas(client, namespace).await? {
        match status {
            Ok(s) => proxies.extend(s["proxies"].as_array().into_iter().flatten().map(|p| {
                let mut p = p.clone();
                p["controlPlane"] = replica.clone().into();
                p
            })),
            Err(e) => anyhow::bail!("control-plane replica {replica}: {e}"),
        }
    }
    Ok(serde_json::json!({ "proxies": proxies }))
}

/// One line of `ferryctl check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub ok: bool,
    /// Passed, with something to know (an optional part missing): `ok` stays true.
    pub warning: bool,
    pub what: String,
    /// What to do about a failed check, or a warning.
    pub hint: Option<String>,
}

fn pass(what: impl Into<String>) -> Check {
    Check { ok: true, warning: false, what: what.into(), hint: None }
}

fn fail(what: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { ok: false, warning: false, what: what.into(), hint: Some(hint.into()) }
}

fn warn(what: impl Into<String>, hint: impl Into<String>) -> Check {
    Check { ok: true, warning: true, what: what.into(), hint: Some(hint.into()) }
}

/// The HTTPRoute fields Ferry serves that the installed CRD lacks (the API server prunes them): a warning naming each
/// route whose last `kubectl apply` set one (it lost it), else a note that the field is not available.
async fn route_fields(client: &Client, crds: &Api<CustomResourceDefinition>) -> Vec<Check> {
    use ferry_api::kubernetes::gateway::{self, HttpRouteObject};
    let Ok(Some(crd)) = crds.get_opt(gateway::CRDS[0].0).await else { return Vec::new() };
    let schema = crd.spec.versions.iter().find(|v| v.name == "v1").and_then(|v| v.schema.as_ref());
    let schema = serde_json::to_value(schema.and_then(|s| s.open_api_v3_schema.as_ref())).unwrap_or_default();
    let missing: Vec<_> =
        gateway::ROUTE_FIELDS.iter().filter(|(field, _)| gateway::schema_has(&schema, field) == Some(false)).collect();
    if missing.is_empty() {
        return Vec::new();
    }
    // What each route was last applied with (`kubectl apply` keeps it), before the API server pruned it.
    let applied: Vec<(String, Value)> =
        match Api::<HttpRouteObject>::all(client.clone()).list(&Default::default()).await {
            Ok(list) => list
                .items
                .iter()
                .filter_map(|r| {
                    let text = r.annotations().get("kubectl.kubernetes.io/last-applied-configuration")?;
                    Some((
                        format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any()),
                        serde_json::from_str(text).ok()?,
                    ))
                })
                .collect(),
            Err(e) => return vec![fail(format!("HTTPRoutes: {e}"), "may your user list httproutes?")],
        };
    let version = gateway::GATEWAY_API_VERSION;
    missing
        .into_iter()
        .map(|(field, channel)| {
            let users: Vec<&str> =
                applied.iter().filter(|(_, r)| gateway::sets(r, field)).map(|(name, _)| name.as_str()).collect();
            let install = format!(
                "{field} is in {channel}: kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/{version}/experimental-install.yaml"
            );
            match users.as_slice() {
                [] => pass(format!("the installed HTTPRoute CRD lacks {field} (no route sets it)")),
                users => warn(
                    format!(
                        "the installed HTTPRoute CRD lacks {field}, which HTTPRoute {} set: the API server dropped it",
                        users.join(", ")
                    ),
                    install,
                ),
            }
        })
        .collect()
}

fn days(seconds: i64) -> String {
    format!("{:.0} days", seconds as f64 / 86_400.0)
}

/// Pre-flight and health checks (like `linkerd check`): the API server, the CRDs (and that they are this version's),
/// the control plane's readiness, the webhook, the mesh root's lifetime, and every meshed pod's proxy connected,
/// in sync and with a certificate past `leaf_horizon` seconds.
pub async fn check(client: &Client, namespace: &str, horizon: i64, leaf_horizon: Option<i64>) -> Vec<Check> {
    let mut checks = Vec::new();
    match client.apiserver_version().await {
        Ok(v) => checks.push(pass(format!("Kubernetes API server reachable (v{}.{})", v.major, v.minor))),
        Err(e) => {
            checks.push(fail(
                format!("Kubernetes API server reachable: {e}"),
                "check KUBECONFIG and `kubectl config current-context`",
            ));
            return checks;
        }
    }
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for (_, ours) in ferry_api::kubernetes::crd::crds() {
        let name = ours.name_any();
        match crds.get_opt(&name).await {
            Ok(Some(theirs)) => {
                let schema = |c: &CustomResourceDefinition| {
                    serde_json::to_value(c.spec.versions.first().and_then(|v| v.schema.clone())).unwrap_or_default()
                };
                if schema(&theirs) == schema(&ours) {
                    checks.push(pass(format!("CRD {name} installed")));
                } else {
                    checks.push(fail(
                        format!("CRD {name} installed but not this version's"),
                        "kubectl apply -k deploy/ from the same release as ferryctl (or `ferryctl crds | kubectl apply -f -`)",
                    ));
                }
            }
            Ok(None) => checks.push(fail(format!("CRD {name} installed"), "kubectl apply -k deploy/")),
            Err(e) => {
                checks.push(fail(format!("CRD {name}: {e}"), "does your user may read customresourcedefinitions?"))
            }
        }
    }
    // The Gateway API (optional; Ferry does not install it): without its CRDs, routes cannot be created and routing
    // by them is off.
    let version = ferry_api::kubernetes::gateway::GATEWAY_API_VERSION;
    for (name, served) in ferry_api::kubernetes::gateway::CRDS {
        let off = match name.split('.').next() {
            Some("httproutes") => "routing by HTTPRoute is off",
            Some("grpcroutes") => "routing by GRPCRoute is off",
            _ => "no ReferenceGrant can permit a route's backend in another namespace",
        };
        let install = format!(
            "install the Gateway API's standard channel: kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/{version}/standard-install.yaml"
        );
        match crds.get_opt(name).await {
            Ok(Some(crd)) if crd.spec.versions.iter().any(|v| v.name == served && v.served) => {
                checks.push(pass(format!("Gateway API CRD {name} installed (serving {served})")))
            }
            Ok(Some(_)) => checks.push(fail(format!("Gateway API CRD {name} does not serve {served}"), install)),
            Ok(None) => checks.push(warn(format!("Gateway API CRD {name} not installed: {off}"), install)),
            Err(e) => checks
                .push(fail(format!("Gateway API CRD {name}: {e}"), "may your user read customresourcedefinitions?")),
        }
    }
    checks.extend(route_fields(client, &crds).await);
    match Api::<Deployment>::namespaced(client.clone(), namespace).get_opt(CONTROL_PLANE).await {
        Ok(Some(d)) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
            let what = format!("control plane ready ({ready}/{want} replicas of {namespace}/{CONTROL_PLANE})");
            if ready >= 1 {
                checks.push(if ready >= want {
                    pass(what)
                } else {
                    fail(what, format!("kubectl -n {namespace} describe deploy/{CONTROL_PLANE}"))
                });
            } else {
                checks.push(fail(what, format!("kubectl -n {namespace} logs deploy/{CONTROL_PLANE}")));
            }
        }
        Ok(None) => checks
            .push(fail(format!("control plane installed ({namespace}/{CONTROL_PLANE})"), "kubectl apply -k deploy/")),
        Err(e) => checks.push(fail(format!("control plane: {e}"), "kubectl apply -k deploy/")),
    }
    let root = match Api::<Secret>::namespaced(client.clone(), namespace).get_opt(CA_SECRET).await {
        Ok(Some(s)) => s.data.and_then(|d| d.get("tls.crt").map(|b| String::from_utf8_lossy(&b.0).into_owned())),
        _ => None,
    };
    let now = ferry_api::identity::unix_now();
    match root.as_deref().map(ferry_api::identity::root_expiry) {
        Some(Some(not_after)) if not_after - now > horizon => {
            checks.push(pass(format!("mesh root ({namespace}/{CA_SECRET}) valid for {}", days(not_after - now))))
        }
        Some(Some(not_after)) => checks.push(fail(
            format!("mesh root ({namespace}/{CA_SECRET}) expires in {}", days(not_after - now)),
            "rotate the root before it expires (bring your own root with --ca-cert/--ca-key)",
        )),
        Some(None) => checks.push(fail(
            format!("mesh root ({namespace}/{CA_SECRET}) is not a certificate"),
            "delete the Secret and restart ferry-control",
        )),
        None => checks.push(fail(
            format!("mesh root ({namespace}/{CA_SECRET}) exists"),
            "ferry-control creates it when it starts: is it running?",
        )),
    }
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    match hooks.get_opt(WEBHOOK_CONFIGURATION).await {
        Ok(Some(h)) => {
            let bundles: Vec<String> = h
                .webhooks
                .iter()
                .flatten()
                .map(|w| {
                    w.client_config
                        .ca_bundle
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                        .unwrap_or_default()
                })
                .collect();
            let trusted =
                root.as_ref().is_some_and(|r| !bundles.is_empty() && bundles.iter().all(|b| b.contains(r.trim())));
            if trusted {
                checks.push(pass(format!("injector webhook {WEBHOOK_CONFIGURATION} configured with the mesh root")));
            } else {
                checks.push(fail(
                    format!("injector webhook {WEBHOOK_CONFIGURATION}'s caBundle is not the mesh root"),
                    "ferry-control sets it at start: check its logs (RBAC on mutatingwebhookconfigurations)",
                ));
            }
        }
        Ok(None) => checks
            .push(fail(format!("injector webhook {WEBHOOK_CONFIGURATION} configured"), "kubectl apply -k deploy/")),
        Err(e) => checks.push(fail(format!("injector webhook: {e}"), "kubectl apply -k deploy/")),
    }
    // Proxies: every meshed, running pod connected to a replica, in sync, with a certificate that is not expiring.
    let mut connected = std::collections::BTreeMap::new();
    match replicas(client, namespace).await {
        Ok(list) => {
            for (replica, status) in list {
                match status {
                    Ok(s) => {
                        for p in s["proxies"].as_array().into_iter().flatten() {
                            connected.insert(p["node"].as_str().unwrap_or_default().to_string(), p.clone());
                        }
                    }
                    Err(e) => checks.push(fail(
                        format!("control-plane replica {replica} answers: {e}"),
                        format!("kubectl -n {namespace} logs {replica}"),
                    )),
                }
            }
        }
        Err(e) => checks.push(fail(format!("listing control-plane pods: {e}"), "kubectl apply -k deploy/")),
    }
    let meshed = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{}=true", ferry_api::kubernetes::inject::INJECTED_LABEL)))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let running: Vec<&Pod> =
        meshed.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).collect();
    let mut missing = Vec::new();
    for pod in &running {
        let node = format!("{}.{}", pod.name_any(), pod.namespace().unwrap_or_default());
        let Some(p) = connected.get(&node) else {
            missing.push(node);
            continue;
        };
        let identity = p["identity"].as_str().unwrap_or_default();
        if p["stale"] == true {
            checks.push(fail(
                format!("proxy {node} ({identity}) in sync"),
                format!("ferryctl status; kubectl logs {} -c ferry-proxy", pod.name_any()),
            ));
            continue;
        }
        let lifetime_left = p["certificateExpiry"].as_i64().map(|t| t - now);
        match (lifetime_left, leaf_horizon) {
            (Some(left), Some(h)) if left <= h => checks.push(fail(
                format!("proxy {node} ({identity}) certificate expires in {left}s"),
                "a healthy proxy renews at half-life: check its logs",
            )),
            _ => checks.push(pass(format!("proxy {node} ({identity}) in sync"))),
        }
    }
    if !missing.is_empty() {
        checks.push(fail(
            format!("{} meshed pod(s) not connected to the control plane: {}", missing.len(), missing.join(", ")),
            "kubectl logs <pod> -c ferry-proxy (certificate request refused? control plane unreachable?)",
        ));
    } else {
        checks.push(pass(format!("every running meshed pod's proxy connected ({})", running.len())));
    }
    checks
}
