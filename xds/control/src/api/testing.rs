//! Test builds only (the `testing` feature, which `ferry-test-support` turns on): `POST /v1/testing/inject` publishes
//! `{"typeUrl", "name", "valueHex"}` as a resource past validation, over the model, so that the proxies' NACK path
//! can be tested; `DELETE /v1/testing/inject` removes what was injected. Never in release builds.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::ads::Xds;
use crate::api::{Body, error, json, read_body};

/// The `/v1/testing/...` routes of the API.
pub async fn route(req: Request<Incoming>, xds: Option<&Xds>) -> Response<Body> {
    let Some(xds) = xds else { return error(StatusCode::NOT_FOUND, "this control plane serves no xDS") };
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, "/v1/testing/inject") => match read_body(req).await {
            Ok(text) => inject(xds, &text),
            Err(response) => response,
        },
        (Method::DELETE, "/v1/testing/inject") => {
            xds.clear_overlay();
            json(StatusCode::OK, serde_json::json!({ "result": "cleared" }))
        }
        _ => error(StatusCode::NOT_FOUND, "no such testing route"),
    }
}

fn inject(xds: &Xds, text: &str) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Inject {
        type_url: String,
        name: String,
        value_hex: String,
    }
    let req: Inject = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let bytes: Result<Vec<u8>, _> = (0..req.value_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(req.value_hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect();
    let Ok(value) = bytes else { return error(StatusCode::BAD_REQUEST, "valueHex: not hex") };
    tracing::warn!(type_url = %req.type_url, name = %req.name, "TESTING: injecting an unvalidated resource");
    xds.overlay(req.name, envoy_types::pb::google::protobuf::Any { type_url: req.type_url, value });
    json(StatusCode::OK, serde_json::json!({ "result": "injected" }))
}
