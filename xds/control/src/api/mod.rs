//! The control plane's HTTP/JSON API (used by `ferryctl`): apply, get, list, replace and delete per kind, behind
//! the admin token.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::ads::Xds;
use crate::identity::tokens::Tokens;
use crate::metrics::ControlMetrics;
use crate::store::{Key, Store, StoreError};
use ferry_api::config::{canonical_kind, is_dns_label, parse_documents};
use ferry_api::http_api::MAX_BODY_BYTES;

#[cfg(feature = "testing")]
pub mod testing;

pub struct Api {
    pub store: Arc<Mutex<Store>>,
    pub tokens: Arc<Mutex<Tokens>>,
    token: String,
    pub metrics: Option<Arc<ControlMetrics>>,
    /// The xDS server, told about every change and asked for `/v1/status`.
    pub xds: Option<Arc<Xds>>,
    /// The CA and everything a root rotation reaches (`/v1/ca`).
    pub authority: Option<Arc<crate::identity::rotation::Authority>>,
}

pub(crate) type Body = Full<Bytes>;

pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec_pretty(&value).expect("serializable"))))
        .expect("valid response")
}

pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(status, serde_json::json!({ "error": message.to_string() }))
}

/// Equal-length byte strings compared without an early exit, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A stored object as the API shows it; a route (HTTPRoute, GRPCRoute) with its `status` (per parent Service: Accepted, ResolvedRefs),
/// computed from what the store holds now.
fn with_status<'s>(
    stored: &crate::store::Stored,
    refs: &std::sync::OnceLock<ferry_api::config::References<'s>>,
    store: &'s crate::store::Store,
) -> serde_json::Value {
    let mut json = stored.to_json();
    if let Some(route) = ferry_api::config::RouteRef::of(&stored.document) {
        let refs = refs.get_or_init(|| ferry_api::config::References::of(store.all().map(|s| &s.document)));
        json["status"] = refs.route_status(route, stored.generation as i64);
    }
    json
}

impl Api {
    pub fn new(
        store: Arc<Mutex<Store>>,
        tokens: Arc<Mutex<Tokens>>,
        token: String,
        metrics: Option<Arc<ControlMetrics>>,
        xds: Option<Arc<Xds>>,
        authority: Option<Arc<crate::identity::rotation::Authority>>,
    ) -> Self {
        Api { store, tokens, token, metrics, xds, authority }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        bearer_is(req.headers(), &self.token)
    }

    /// The answer to a request without the admin token (`WWW-Authenticate: Bearer`).
    pub fn unauthorized() -> Response<Body> {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong admin token (Authorization: Bearer <token>)");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid header"));
        r
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        // Only a successful write can change what the store holds.
        let writes = matches!(*req.method(), Method::POST | Method::PUT | Method::DELETE);
        let response = if self.authorized(&req) { self.clone().route(req).await } else { Self::unauthorized() };
        let changed = writes && response.status().is_success();
        if let Some(m) = &self.metrics {
            m.api_requests.with_label_values(&[response.status().as_str()]).inc();
            if changed {
                m.observe_store(&self.store.lock().expect("store lock"));
            }
        }
        if let (true, Some(xds)) = (changed, &self.xds) {
            xds.changed();
        }
        Ok(response)
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path: Vec<String> = req.uri().path().trim_matches('/').split('/').map(str::to_string).collect();
        let query = req.uri().query().unwrap_or("").to_string();
        let dry_run = query.split('&').any(|kv| kv == "dryRun=true" || kv == "dryRun");
        let namespace = query.split('&').find_map(|kv| kv.strip_prefix("namespace=")).map(str::to_string);
        let method = req.method().clone();
        let segments: Vec<&str> = path.iter().map(String::as_str).collect();
        match (method, segments.as_slice()) {
            (Method::GET, ["v1", "status"]) => match &self.xds {
                Some(xds) => json(StatusCode::OK, xds.status_json()),
                None => error(StatusCode::NOT_FOUND, "this control plane serves no xDS"),
            },
            // Test builds only: the `testing` module's routes (see there).
            #[cfg(feature = "testing")]
            (_, ["v1", "testing", ..]) => testing::route(req, self.xds.as_deref()).await,
            (Method::GET, ["v1", "ca"]) => match &self.authority {
                Some(a) => json(StatusCode::OK, a.status_json()),
                None => error(StatusCode::NOT_FOUND, "this control plane has no CA"),
            },
            (Method::POST, ["v1", "ca", step @ ("rotate" | "retire")]) => {
                let Some(authority) = self.authority.clone() else {
                    return error(StatusCode::NOT_FOUND, "this control plane has no CA");
                };
                let force = query.split('&').any(|kv| kv == "force=true" || kv == "force");
                let step = step.to_string();
                let result = blocking(move || match step.as_str() {
                    "rotate" => authority.rotate().map(|_| authority.status_json()),
                    _ => authority.retire(force).map(|_| authority.status_json()),
                })
                .await;
                match result {
                    Ok(status) => json(StatusCode::OK, status),
                    Err(crate::identity::ca::RotationError::Refused(message)) => error(StatusCode::CONFLICT, message),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
            (Method::POST, ["v1", "tokens"]) => match read_body(req).await {
                Ok(text) => self.create_token(&text).await,
                Err(r) => r,
            },
            (Method::GET, ["v1", "tokens"]) => {
                let tokens = self.tokens.lock().expect("tokens lock");
                let items: Vec<_> = tokens.list().iter().map(|t| t.public_json()).collect();
                json(StatusCode::OK, serde_json::json!({ "items": items }))
            }
            (Method::DELETE, ["v1", "tokens", id]) => {
                let (tokens, id) = (self.tokens.clone(), id.to_string());
                match blocking(move || tokens.lock().expect("tokens lock").revoke(&id)).await {
                    Ok(Some(record)) => {
                        if let Some(xds) = &self.xds {
                            xds.token_revoked();
                        }
                        json(StatusCode::OK, serde_json::json!({ "result": "revoked", "token": record.public_json() }))
                    }
                    Ok(None) => error(StatusCode::NOT_FOUND, "no such token"),
                    Err(e) => store_error(e),
                }
            }
            (Method::POST, ["v1", "apply"]) => match read_body(req).await {
                Ok(text) => self.apply(&text, dry_run, None).await,
                Err(r) => r,
            },
            (Method::GET, ["v1", kind]) => match canonical_kind(kind) {
                Some(kind) => {
                    let store = self.store.lock().expect("store lock");
                    let refs = std::sync::OnceLock::new();
                    let items: Vec<_> =
                        store.list(kind, namespace.as_deref()).iter().map(|s| with_status(s, &refs, &store)).collect();
                    json(StatusCode::OK, serde_json::json!({ "kind": kind, "items": items }))
                }
                None => unknown_kind(kind),
            },
            (method, ["v1", kind, ns, name]) => {
                let Some(kind) = canonical_kind(kind) else { return unknown_kind(kind) };
                let key = Key { kind: kind.to_string(), namespace: ns.to_string(), name: name.to_string() };
                match method {
                    Method::GET => {
                        let store = self.store.lock().expect("store lock");
                        match store.get(&key) {
                            Some(stored) => json(StatusCode::OK, with_status(stored, &Default::default(), &store)),
                            None => error(StatusCode::NOT_FOUND, format!("{key} not found")),
                        }
                    }
                    Method::PUT => match read_body(req).await {
                        Ok(text) => self.apply(&text, dry_run, Some(key)).await,
                        Err(r) => r,
                    },
                    Method::DELETE => {
                        let store = self.store.clone();
                        let k = key.clone();
                        match blocking(move || store.lock().expect("store lock").delete(&k)).await {
                            Ok(Some(_)) => {
                                json(StatusCode::OK, serde_json::json!({ "result": "deleted", "object": key }))
                            }
                            Ok(None) => error(StatusCode::NOT_FOUND, format!("{key} not found")),
                            Err(e) => store_error(e),
                        }
                    }
                    _ => error(StatusCode::METHOD_NOT_ALLOWED, "GET, PUT or DELETE"),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "routes: POST /v1/apply[?dryRun=true], GET /v1/{kind}[?namespace=ns], GET|PUT|DELETE /v1/{kind}/{namespace}/{name}",
            ),
        }
    }

    /// Mints a join token from `{"namespace", "serviceAccount", "ttl"}`; the reply holds the only copy of the secret.
    async fn create_token(&self, text: &str) -> Response<Body> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Create {
            namespace: String,
            service_account: String,
            #[serde(default)]
            ttl: Option<String>,
        }
        let req: Create = match serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text)) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{}: {}", e.path(), e.inner())),
        };
        for (field, value) in [("namespace", &req.namespace), ("serviceAccount", &req.service_account)] {
            if !is_dns_label(value) {
                return error(StatusCode::UNPROCESSABLE_ENTITY, format!("{field}: `{value}` must be a DNS label"));
            }
        }
        let ttl = match ferry_api::parse_duration(req.ttl.as_deref().unwrap_or("24h")) {
            Ok(d) if !d.is_zero() && d <= std::time::Duration::from_secs(366 * 24 * 3600) => d,
            Ok(_) => return error(StatusCode::UNPROCESSABLE_ENTITY, "ttl: must be more than 0s and at most 366 days"),
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("ttl: {e}")),
        };
        let tokens = self.tokens.clone();
        match blocking(move || tokens.lock().expect("tokens lock").create(&req.namespace, &req.service_account, ttl))
            .await
        {
            Ok((record, token)) => {
                let mut reply = record.public_json();
                reply["token"] = token.into();
                json(StatusCode::CREATED, reply)
            }
            Err(e) => store_error(e),
        }
    }

    /// Validates every document (all errors, naming document and field), then stores them all or none.
    async fn apply(&self, text: &str, dry_run: bool, expected: Option<Key>) -> Response<Body> {
        let documents = match parse_documents(text) {
            Ok(d) => d,
            Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
        };
        if let Some(key) = expected {
            match documents.as_slice() {
                [doc] if Key::of(doc) == key => {}
                _ => return error(StatusCode::BAD_REQUEST, format!("the body must be exactly one document: {key}")),
            }
        }
        if documents.is_empty() {
            return error(StatusCode::BAD_REQUEST, "no documents");
        }
        let store = self.store.clone();
        match blocking(move || store.lock().expect("store lock").apply(documents, dry_run)).await {
            Ok(results) => json(StatusCode::OK, serde_json::json!({ "dryRun": dry_run, "results": results })),
            Err(e) => store_error(e),
        }
    }
}

fn unknown_kind(kind: &str) -> Response<Body> {
    error(StatusCode::NOT_FOUND, format!("unknown kind `{kind}` (Service, TrafficPolicy, AuthorizationPolicy)"))
}

fn store_error(e: StoreError) -> Response<Body> {
    match e {
        StoreError::Invalid(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        other => {
            tracing::error!(error = %other, "store write failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, other)
        }
    }
}

/// Runs store work (fsync) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("store task panicked")
}

pub(crate) async fn read_body(req: Request<Incoming>) -> Result<String, Response<Body>> {
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES)
    {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(body) => String::from_utf8(body.to_bytes().to_vec())
            .map_err(|_| error(StatusCode::BAD_REQUEST, "the body is not UTF-8")),
        Err(_) => Err(too_large()),
    }
}

fn too_large() -> Response<Body> {
    error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {} MiB", MAX_BODY_BYTES / (1024 * 1024)))
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time).
pub fn bearer_is(headers: &http::HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(presented.trim().as_bytes(), token.as_bytes())
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_table() {
        use super::constant_time_eq as eq;
        assert!(eq(b"abc", b"abc"));
        assert!(!eq(b"abc", b"abd"));
        assert!(!eq(b"abc", b"ab"));
        assert!(!eq(b"", b"a"));
    }
}
