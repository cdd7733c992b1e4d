//! The mutating admission webhook (`POST /inject`, AdmissionReview v1 over HTTPS): the CLI's injection of a Pod,
//! answered as a JSON patch.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::identity::serving::ServingTls;
use ferry_api::kubernetes::inject::{self, Outcome, Settings};

/// An AdmissionReview larger than this is refused (the API server's own limit on a request is 3 MiB).
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// Why a request got no AdmissionReview back: it was not one.
#[derive(Debug, PartialEq, Eq)]
pub struct BadReview(pub String);

/// Answers one AdmissionReview (the request body): a response review allowing the Pod, with the injection as a JSON
/// patch; allowing it unchanged when it opted out or is not a Pod; denying it, with the reason, when its
/// annotations are invalid. A body that is not an AdmissionReview is a [`BadReview`].
pub fn review(body: &[u8], settings: &Settings) -> Result<AdmissionReview<DynamicObject>, BadReview> {
    let raw: Value = serde_json::from_slice(body).map_err(|e| BadReview(format!("not JSON: {e}")))?;
    if raw["apiVersion"] != "admission.k8s.io/v1" || raw["kind"] != "AdmissionReview" {
        return Err(BadReview(format!(
            "expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {}, {}",
            raw["apiVersion"], raw["kind"]
        )));
    }
    let typed: AdmissionReview<DynamicObject> =
        serde_json::from_value(raw.clone()).map_err(|e| BadReview(format!("not an AdmissionReview: {e}")))?;
    let request: AdmissionRequest<DynamicObject> =
        typed.try_into().map_err(|_| BadReview("an AdmissionReview without a request".into()))?;
    let mut response = AdmissionResponse::from(&request);
    // The object exactly as the API server sent it (not through typed metadata), so the patch touches only what the
    // injection changes.
    let mut pod = raw["request"]["object"].clone();
    if request.kind.kind != "Pod" || !pod.is_object() {
        let note = format!("ferry injects Pods; {} passed through", request.kind.kind);
        response.warnings = Some(vec![note]);
        return Ok(response.into_review());
    }
    if pod.get("kind").is_none() {
        pod["kind"] = "Pod".into();
    }
    let before = pod.clone();
    let name = match (request.namespace.as_deref(), inject::describe(&pod)) {
        (Some(ns), described) if pod["metadata"]["namespace"].is_null() => {
            described.replacen("Pod ", &format!("Pod {ns}/"), 1)
        }
        (_, described) => described,
    };
    let outcome = match inject::inject_template(&mut pod, settings) {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::info!(pod = %name, error = %e, "injection refused");
            return Ok(response.deny(format!("ferry injection: {name}: {}: {}", e.field, e.message)).into_review());
        }
    };
    tracing::info!(pod = %name, outcome = ?outcome, dry_run = request.dry_run, "admission review");
    match outcome {
        Outcome::Injected => {
            let patch = json_patch::diff(&before, &pod);
            let response = response.with_patch(patch).map_err(|e| BadReview(e.to_string()))?;
            Ok(response.into_review())
        }
        _ => Ok(response.into_review()),
    }
}

/// The review as the API server reads it: the patch as base64 (as Go encodes bytes), not a list of numbers.
pub fn wire(answer: AdmissionReview<DynamicObject>) -> Value {
    use base64::Engine;
    let mut value = serde_json::to_value(answer).expect("serializable");
    if let Some(bytes) = value["response"]["patch"].as_array() {
        let bytes: Vec<u8> = bytes.iter().filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok())).collect();
        value["response"]["patch"] = base64::engine::general_purpose::STANDARD.encode(bytes).into();
    }
    value
}

async fn handle(req: Request<Incoming>, settings: Arc<Settings>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &'static str, body: Vec<u8>| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
        Ok(resp)
    };
    let text = |status: StatusCode, message: String| reply(status, "text/plain; charset=utf-8", message.into_bytes());
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => {}
        (_, "/health/ready") => return text(StatusCode::OK, "ready\n".into()),
        _ => return text(StatusCode::NOT_FOUND, "POST an AdmissionReview to /inject\n".into()),
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the AdmissionReview: {e}\n")),
    };
    match review(&body, &settings) {
        Ok(answer) => {
            reply(StatusCode::OK, "application/json", serde_json::to_vec(&wire(answer)).expect("serializable"))
        }
        Err(BadReview(message)) => {
            tracing::info!(error = %message, "malformed admission review");
            text(StatusCode::BAD_REQUEST, format!("{message}\n"))
        }
    }
}

/// Serves the webhook over HTTPS (the xDS serving certificate, renewed with it) on `listener` for the life of the
/// process.
pub fn serve(listener: TcpListener, tls: Arc<ServingTls>, settings: Settings) {
    let settings = Arc::new(settings);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (config, settings) = (tls.webhook(), settings.clone());
            tokio::spawn(async move {
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                let stream = match tokio::time::timeout(Duration::from_secs(10), accept).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::info!(peer = %remote, error = %e, "webhook TLS handshake failed"),
                    Err(_) => return tracing::info!(peer = %remote, "webhook TLS handshake timed out"),
                };
                let svc = hyper::service::service_fn(move |req| handle(req, settings.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn admission(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        }))
        .unwrap()
    }

    #[test]
    fn bad_reviews_say_what_is_wrong() {
        let s = Settings::default();
        for (body, want) in [
            (b"{".to_vec(), "not JSON"),
            (b"[]".to_vec(), "expected apiVersion admission.k8s.io/v1"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "without a request"),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#.to_vec(),
                "not an AdmissionReview",
            ),
        ] {
            let err = review(&body, &s).unwrap_err().0;
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn a_bad_annotation_denies_the_pod_naming_it() {
        let pod = json!({"metadata": {"generateName": "web-7d9f-", "annotations": {"ferry.dev/proxy-cpu": "lots"}},
                         "spec": {"containers": [{"name": "web", "image": "web"}]}});
        let answer = serde_json::to_value(review(&admission(pod), &Settings::default()).unwrap()).unwrap();
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains("Pod shop/web-7d9f-: metadata.annotations[ferry.dev/proxy-cpu]"), "{message}");
    }
}
