//! The admission webhook of a real `ferry-control` over real HTTPS (its certificate from the mesh CA), with
//! AdmissionReview JSON as the API server sends it: the JSON patch, applied, equals `ferryctl inject`'s output; an
//! opt-out and an injected pod get no patch; malformed reviews get a clear 400 and the webhook keeps serving.

use ferry_test_support::control as support;

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use ferry_test_support::free_addr;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use support::{ControlPlane, state_dir};

const IMAGE: &str = "example.com/ferry/proxy:test";

/// A Pod as the ReplicaSet controller creates it from the web Deployment's template, with the API server's defaults.
fn replicaset_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-5f7c9d8b6-",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "web", "pod-template-hash": "5f7c9d8b6"},
            "annotations": {"prometheus.io/scrape": "true", "ferry.dev/skip-outbound-ports": "5432"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5f7c9d8b6",
                                  "uid": "3f0b1c7e-1d2a-4b5c-9e8f-0a1b2c3d4e5f", "controller": true,
                                  "blockOwnerDeletion": true}]
        },
        "spec": {
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "securityContext": {"runAsNonRoot": true},
            "initContainers": [{"name": "migrate", "image": "registry.example.com/web:2", "command": ["/migrate"],
                                 "imagePullPolicy": "IfNotPresent", "terminationMessagePath": "/dev/termination-log",
                                 "terminationMessagePolicy": "File", "resources": {}}],
            "containers": [{
                "name": "web",
                "image": "registry.example.com/web:2",
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                                   "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                                   "failureThreshold": 3},
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 5, "timeoutSeconds": 1,
                                    "successThreshold": 1, "failureThreshold": 3},
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                              "tolerationSeconds": 300}],
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0
        }
    })
}

fn admission_review(uid: &str, kind: &str, object: Value) -> String {
    let resource = if kind == "Pod" { "pods" } else { "deployments" };
    let group = if kind == "Pod" { "" } else { "apps" };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": resource},
            "requestKind": {"group": group, "version": "v1", "kind": kind},
            "requestResource": {"group": group, "version": "v1", "resource": resource},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                          "uid": "a1b2", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
    .to_string()
}

/// POSTs `body` to the webhook over HTTPS, trusting only the mesh root; (status, body).
async fn post(addr: SocketAddr, root_pem: &[u8], path: &str, body: String) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("ferry-control.ferry-system.svc").unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("a verified handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "ferry-control.ferry-system.svc:443")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn ctl_inject(pod: &Value) -> Value {
    let mut child = std::process::Command::new(support::ctl_bin())
        .args(["inject", "-f", "-", "--proxy-image", IMAGE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(pod.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

fn response(body: &str) -> Value {
    let review: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        (review["apiVersion"].as_str(), review["kind"].as_str()),
        (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
    );
    review["response"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_patches_pods_like_the_cli() {
    let webhook = free_addr();
    let state = state_dir("webhook");
    let cp = tokio::task::block_in_place(|| {
        ControlPlane::start_on(
            &state,
            [free_addr(), free_addr(), free_addr()],
            &[
                "--webhook-addr",
                &webhook.to_string(),
                "--server-name",
                "ferry-control.ferry-system.svc",
                "--proxy-image",
                IMAGE,
            ],
        )
    });
    let root = std::fs::read(state.join("ca.crt")).unwrap();
    // (ferry-control binds the webhook before its API, and start_on waits for the API.)

    // A pod in a labelled namespace: the patch, applied, is exactly what ferryctl inject makes of the same pod.
    let pod = replicaset_pod();
    let (status, body) = post(webhook, &root, "/inject", admission_review("uid-1", "Pod", pod.clone())).await;
    assert_eq!(status, 200, "{body}");
    let answer = response(&body);
    assert_eq!((answer["uid"].as_str(), answer["allowed"].as_bool()), (Some("uid-1"), Some(true)), "{answer}");
    assert_eq!(answer["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD.decode(answer["patch"].as_str().expect("base64")).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(patched, ctl_inject(&pod), "webhook and CLI disagree");
    assert_eq!(patched["spec"]["initContainers"][1]["name"], "ferry-proxy");
    assert_eq!(patched["spec"]["initContainers"][1]["image"], IMAGE);
    assert_eq!(
        patched["spec"]["initContainers"][2]["name"], "migrate",
        "the app's init container runs after the proxy"
    );

    // Opted out, or already injected: allowed, no patch.
    let mut opted_out = pod.clone();
    opted_out["metadata"]["annotations"]["ferry.dev/inject"] = json!("disabled");
    for (uid, object) in [("uid-2", opted_out), ("uid-3", patched.clone())] {
        let (status, body) = post(webhook, &root, "/inject", admission_review(uid, "Pod", object)).await;
        let answer = response(&body);
        assert_eq!((status, answer["uid"].as_str(), answer["allowed"].as_bool()), (200, Some(uid), Some(true)));
        assert!(answer.get("patch").is_none(), "{answer}");
    }

    // Not a pod: passed through with a warning. A bad annotation: denied, naming it.
    let (_, body) =
        post(webhook, &root, "/inject", admission_review("uid-4", "Deployment", json!({"kind": "Deployment"}))).await;
    let answer = response(&body);
    assert_eq!(answer["allowed"], true);
    assert!(answer["warnings"][0].as_str().unwrap().contains("Deployment passed through"), "{answer}");
    let mut bad = pod.clone();
    bad["metadata"]["annotations"]["ferry.dev/skip-outbound-ports"] = json!("postgres");
    let (_, body) = post(webhook, &root, "/inject", admission_review("uid-5", "Pod", bad)).await;
    let answer = response(&body);
    assert_eq!(answer["allowed"], false);
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("metadata.annotations[ferry.dev/skip-outbound-ports]: `postgres` is not a port"),
        "{message}"
    );

    // Malformed reviews: a clear 400, never a crash; the webhook answers the next review as before.
    for (body, want) in [
        ("{\"apiVersion\": ".to_string(), "not JSON"),
        (
            "{\"apiVersion\":\"admission.k8s.io/v1beta1\",\"kind\":\"AdmissionReview\"}".to_string(),
            "expected apiVersion admission.k8s.io/v1",
        ),
        ("{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}".to_string(), "without a request"),
        (
            admission_review("uid-6", "Pod", json!(null)).replace("\"uid\":\"uid-6\"", "\"uid\":6"),
            "not an AdmissionReview",
        ),
    ] {
        let (status, text) = post(webhook, &root, "/inject", body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(want), "{text}");
    }
    let (status, _) = post(webhook, &root, "/other", String::new()).await;
    assert_eq!(status, 404);
    let (status, body) = post(webhook, &root, "/inject", admission_review("uid-7", "Pod", replicaset_pod())).await;
    assert_eq!((status, response(&body)["uid"].as_str()), (200, Some("uid-7")));
    drop(cp);
}
