//! Forwards one HTTP request: picks the destination, strips hop-by-hop headers, sends it over the pool, relays upgrades.
//! Between proxies every request is HTTP/2 over mTLS: an HTTP/1 request carries `ferry-orig-proto` and an HTTP/1
//! upgrade travels as an extended CONNECT (RFC 8441); the receiving proxy restores both for the app, and tells the app
//! who called in `ferry-client-id`.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::ProxyBody;
use super::pool::HttpVersion;
use super::target::{ConnInfo, Destination, Mode, Refusal, UNKNOWN_SERVICE};
use super::{Direction, Proxy};
use crate::authz::AuthzLayer;
use crate::balance::{BalanceLayer, Picked};
use crate::breaker::BreakerLayer;
use crate::concurrency::ConcurrencyLayer;
use crate::errors::{self, ProxyError};
use crate::ratelimit::RateLimitLayer;
use crate::retry::RetryLayer;
use crate::timeout::{PerTryTimeoutLayer, RequestTimeoutLayer};
use tower::ServiceExt;

/// The verified SPIFFE ID of the calling workload, set by the destination's proxy (and removed from anything else).
pub const CLIENT_ID_HEADER: &str = "ferry-client-id";
/// Between proxies: the caller's HTTP version when it was not HTTP/2 (`HTTP/1.1`), restored for the app.
pub const ORIG_PROTO_HEADER: &str = "ferry-orig-proto";

impl Proxy {
    /// Handles one request end to end; never fails: proxy errors become responses here, through `errors::respond`.
    pub(super) async fn forward(self: Arc<Self>, req: Request<Incoming>, conn: ConnInfo) -> Response<ProxyBody> {
        let start = Instant::now();
        let direction = conn.direction;
        let grpc = is_grpc(req.headers());
        // Only what the access log needs, and only when it is on.
        let logged =
            self.settings.access_log.then(|| (req.method().clone(), req.uri().path().to_string(), req.version()));
        // The endpoint of each try, in order (the load balancer adds them).
        let tried = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (service, result) = match self.request_destination(&req, &conn) {
            Ok((dest, authority)) => {
                let service = dest.service.clone();
                let req = req.map(ProxyBody::from);
                let result = match direction {
                    Direction::Outbound => {
                        let stack = self.clone().outbound_stack(dest, authority, conn.clone(), tried.clone());
                        stack.oneshot(req).await
                    }
                    Direction::Inbound => {
                        if let Some(addr) = dest.fixed_addr() {
                            tried.lock().expect("tried lock").push(addr);
                        }
                        self.clone().inbound_stack(dest, authority, conn.clone()).oneshot(req).await
                    }
                };
                (service, result)
            }
            Err((service, e)) => (service, Err(e)),
        };
        let upstream = tried.lock().expect("tried lock").last().copied();
        let (response, error) = match result {
            Ok(resp) => (resp, None),
            Err(e) => {
                self.metrics.proxy_error(direction, e.reason());
                (errors::respond(&e, grpc), Some(e))
            }
        };
        let elapsed = start.elapsed();
        self.metrics.requests(direction, &service).record(response.status().as_u16(), elapsed);
        if let Some((method, path, version)) = logged {
            tracing::info!(
                target: "ferry::access",
                direction = direction.as_str(),
                mode = conn.mode.as_str(),
                client = %conn.peer,
                original_dst = conn.original_dst.map(|a| a.to_string()).unwrap_or_default(),
                method = %method,
                path = %path,
                version = ?version,
                service = %service,
                upstream = upstream.map(|a| a.to_string()).unwrap_or_default(),
                status = response.status().as_u16(),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                error = error.as_ref().map(|e| e.reason()).unwrap_or(""),
                detail = error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
            );
        }
        response
    }

    /// The outbound HTTP stack, outermost first (metrics, the access log and the error responder wrap it in
    /// `forward`).
    fn outbound_stack(
        self: Arc<Self>,
        dest: Destination,
        authority: String,
        conn: ConnInfo,
        tried: Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    ) -> impl tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError, Future: Send> + Send
    {
        let policy = dest.outbound.clone();
        let (service, metrics) = (dest.service.clone(), self.metrics.clone());
        let breaker =
            BreakerLayer::new(self.breakers.clone(), policy.breaker.clone(), service.clone(), metrics.clone());
        let retry = RetryLayer::new(policy.retry.clone(), self.budgets.clone(), service.clone(), metrics.clone());
        let caps = ConcurrencyLayer::new(self.limits.clone(), policy.caps, service, metrics.clone());
        let balance = BalanceLayer::new(self.balancers.clone(), dest.fixed_or_choice().err(), tried, metrics);
        let per_try = policy.retry.as_ref().and_then(|r| r.per_try_timeout);
        tower::ServiceBuilder::new()
            // The destination's request timeout covers everything under it, the response body included, and a gRPC
            // caller's own deadline when shorter.
            .layer(RequestTimeoutLayer::new(policy.timeout))
            // Retries within the policy and the budget (each try passes the breaker and caps below).
            .layer(retry)
            // A failing destination is given a rest: while its breaker is open, calls fail fast without an attempt.
            .layer(breaker)
            // And it is never sent more than its caps allow at once (a queue of bounded length, then `overloaded`).
            .layer(caps)
            // Each try must answer in time, so that a retry can still fit in the request timeout.
            .layer(PerTryTimeoutLayer::new(per_try))
            // Each try to the endpoint with the least expected latency (another one than the failed try's when it
            // can), never to one outlier detection has ejected.
            .layer(balance)
            .service(self.upstream(dest, authority, conn))
    }

    /// The inbound HTTP stack, outermost first (metrics, the access log and the error responder wrap it in
    /// `forward`).
    fn inbound_stack(
        self: Arc<Self>,
        dest: Destination,
        authority: String,
        conn: ConnInfo,
    ) -> impl tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError, Future: Send> + Send
    {
        let policy = self.inbound_policy();
        let (caller, limit, service) = (conn.peer_identity.clone(), policy.rate_limit.clone(), policy.service.clone());
        let rate_limit =
            RateLimitLayer::new(self.rate_limits.clone(), limit, service, caller.clone(), self.metrics.clone());
        let authz = AuthzLayer::new(policy, caller, dest.port, self.metrics.clone());
        tower::ServiceBuilder::new()
            // Authorization first: a call the Service does not allow (or plaintext under strict mTLS) never reaches
            // the app, and never spends the rate limit of callers that are allowed.
            .layer(authz)
            // The Service's own protection against overload: admitted calls within its rate (per caller if asked).
            .layer(rate_limit)
            .service(self.upstream(dest, authority, conn))
    }

    /// The innermost service of both stacks: sends each request (each try) to the destination.
    fn upstream(
        self: Arc<Self>,
        dest: Destination,
        authority: String,
        conn: ConnInfo,
    ) -> impl tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError, Future: Send>
    + Clone
    + Send {
        tower::service_fn(move |req| {
            let (proxy, dest, authority, conn) = (self.clone(), dest.clone(), authority.clone(), conn.clone());
            async move { proxy.send(req, &dest, authority, &conn).await }
        })
    }

    /// The request's destination and the authority to send it with (the app's own, else the address dialled).
    fn request_destination<B>(&self, req: &Request<B>, conn: &ConnInfo) -> Result<(Destination, String), Refusal> {
        let mesh_upgrade = conn.peer_identity.is_some() && req.extensions().get::<hyper::ext::Protocol>().is_some();
        if req.method() == http::Method::CONNECT && !mesh_upgrade {
            // Tunnels through an explicit proxy are not a mesh feature: transparent interception carries any TCP.
            return Err((UNKNOWN_SERVICE.into(), ProxyError::BadRequest("CONNECT tunnels are not supported")));
        }
        let authority = authority_of(req);
        if conn.direction == Direction::Outbound && conn.mode == Mode::Explicit && authority.is_none() {
            return Err((UNKNOWN_SERVICE.into(), ProxyError::BadRequest("request names no host")));
        }
        let dest = self.destination(conn, authority.as_deref())?;
        // Without a Host, the address the app dialled (a balanced destination is only reached by original
        // destination then: explicit mode needs a Host).
        let authority = match (authority, dest.fixed_addr(), conn.original_dst) {
            (Some(a), _, _) => a,
            (None, Some(addr), _) | (None, None, Some(addr)) => addr.to_string(),
            (None, None, None) => return Err((dest.service, ProxyError::BadRequest("request names no host"))),
        };
        Ok((dest, authority))
    }

    async fn send(
        &self,
        mut req: Request<ProxyBody>,
        dest: &Destination,
        authority: String,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The endpoint the load balancer chose for this try, else the destination's one address.
        let endpoint = match (req.extensions_mut().remove::<Picked>(), dest.fixed_or_choice()) {
            (Some(Picked(e)), _) | (None, Ok(e)) => e,
            (None, Err(_)) => {
                return Err(ProxyError::NoHealthyEndpoints(format!("no endpoint of {} was chosen", dest.service)));
            }
        };
        self.not_own_listener(endpoint.addr)?;
        let from_mesh = conn.peer_identity.is_some();
        // Only the destination's proxy says who called; nothing from outside gets through under that name.
        if conn.direction == Direction::Inbound {
            req.headers_mut().remove(CLIENT_ID_HEADER);
            if let Some(id) = &conn.peer_identity
                && let Ok(value) = HeaderValue::from_str(&id.spiffe())
            {
                req.headers_mut().insert(CLIENT_ID_HEADER, value);
            }
        }
        let orig_proto = req.headers_mut().remove(ORIG_PROTO_HEADER);
        let downstream_h2 = req.version() == Version::HTTP_2;
        // The upgrade token of an HTTP/1 upgrade, or of an extended CONNECT from a peer proxy.
        let upgrade_token: Option<HeaderValue> = if downstream_h2 {
            let protocol = req.extensions().get::<hyper::ext::Protocol>();
            protocol.filter(|_| from_mesh).and_then(|p| HeaderValue::from_str(p.as_str()).ok())
        } else {
            is_upgrade(req.headers()).then(|| req.headers().get(header::UPGRADE).cloned()).flatten()
        };
        let version = match (dest.tls_for(&endpoint), from_mesh && orig_proto.is_some()) {
            (Some(_), _) => HttpVersion::Http2,
            (None, true) => HttpVersion::Http1,
            (None, false) if downstream_h2 => HttpVersion::Http2,
            (None, false) => HttpVersion::Http1,
        };
        let downstream_upgrade = upgrade_token.is_some().then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), false);
        // 100-continue was answered to the client as we started reading its body.
        req.headers_mut().remove(header::EXPECT);
        let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        let absolute_form = req.uri().authority().is_some();
        match version {
            HttpVersion::Http1 => {
                *req.uri_mut() = Uri::try_from(path).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
                *req.version_mut() = Version::HTTP_11;
                if absolute_form || !req.headers().contains_key(header::HOST) {
                    let host = HeaderValue::from_str(&authority).map_err(|_| ProxyError::BadRequest("invalid host"))?;
                    req.headers_mut().insert(header::HOST, host);
                }
                if let Some(token) = &upgrade_token {
                    if downstream_h2 {
                        // An extended CONNECT from a peer proxy becomes the app's HTTP/1 upgrade again.
                        *req.method_mut() = http::Method::GET;
                        req.extensions_mut().remove::<hyper::ext::Protocol>();
                    }
                    req.headers_mut().insert(header::UPGRADE, token.clone());
                    req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
            }
            HttpVersion::Http2 => {
                *req.uri_mut() = Uri::builder()
                    .scheme("http")
                    .authority(authority.as_str())
                    .path_and_query(path)
                    .build()
                    .map_err(|_| ProxyError::BadRequest("invalid authority"))?;
                if dest.tls_for(&endpoint).is_some() && !downstream_h2 {
                    *req.version_mut() = Version::HTTP_2;
                    req.headers_mut().remove(header::HOST);
                    req.headers_mut().insert(ORIG_PROTO_HEADER, HeaderValue::from_static("HTTP/1.1"));
                    if let Some(token) = upgrade_token.as_ref().and_then(|t| t.to_str().ok()) {
                        *req.method_mut() = http::Method::CONNECT;
                        req.extensions_mut().insert(hyper::ext::Protocol::from(token));
                    }
                }
            }
        }
        let limit = dest.outbound.caps.map(|caps| self.limits.connections(&dest.service, caps));
        let mut resp = self.pool.send(endpoint.addr, version, dest.tls_for(&endpoint), limit.as_ref(), req).await?;
        let upstream_upgraded = match version {
            HttpVersion::Http1 => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
            HttpVersion::Http2 => resp.status() == StatusCode::OK,
        };
        match downstream_upgrade {
            Some(downstream) if upstream_upgraded => {
                let upstream = hyper::upgrade::on(&mut resp);
                let answered = resp.headers().get(header::UPGRADE).cloned();
                strip_hop_by_hop(resp.headers_mut(), false);
                if downstream_h2 {
                    // To the peer proxy's extended CONNECT: 200.
                    *resp.status_mut() = StatusCode::OK;
                } else {
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    let token = answered.or(upgrade_token).expect("an upgrade has a token");
                    resp.headers_mut().insert(header::UPGRADE, token);
                    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                }
                join_upgraded(downstream, upstream);
            }
            _ => strip_hop_by_hop(resp.headers_mut(), false),
        }
        Ok(resp.map(ProxyBody::from))
    }
}

/// Relays bytes between both sides of an upgraded connection until either ends.
fn join_upgraded(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
}

/// The request's target authority: absolute-form URI or `:authority`, else the `Host` header.
fn authority_of<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| !h.is_empty()).map(str::to_string)
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1 and those the `Connection` header lists.
/// `TE: trailers` stays (gRPC needs it); an upgrade keeps `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) && name != header::TE {
            headers.remove(name);
        }
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove(header::CONNECTION);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn hop_by_hop_table() {
        // (input headers, keep_upgrade, names that must remain, names that must be gone)
        type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[
                    ("connection", "keep-alive, x-secret"),
                    ("keep-alive", "timeout=5"),
                    ("x-secret", "1"),
                    ("x-app", "1"),
                ],
                false,
                &["x-app"],
                &["connection", "keep-alive", "x-secret"],
            ),
            (&[("te", "trailers, deflate"), ("transfer-encoding", "chunked")], false, &["te"], &["transfer-encoding"]),
            (&[("te", "gzip")], false, &[], &["te"]),
            (&[("connection", "Upgrade"), ("upgrade", "websocket")], true, &["connection", "upgrade"], &[]),
            (&[("connection", "Upgrade"), ("upgrade", "websocket")], false, &[], &["connection", "upgrade"]),
            (
                &[("proxy-connection", "keep-alive"), ("trailer", "x-checksum")],
                false,
                &["trailer"],
                &["proxy-connection"],
            ),
        ];
        for (input, keep, present, absent) in cases {
            let mut h = headers(input);
            strip_hop_by_hop(&mut h, *keep);
            for name in *present {
                assert!(h.contains_key(*name), "{name} should remain for {input:?}");
            }
            for name in *absent {
                assert!(!h.contains_key(*name), "{name} should be removed for {input:?}");
            }
        }
        let mut h = headers(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrade_and_grpc_recognition() {
        assert!(is_upgrade(&headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")])));
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(is_grpc(&headers(&[("content-type", "application/grpc+proto")])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
    }

    #[test]
    fn authority_prefers_the_uri() {
        let req = Request::builder().uri("http://a.example:8080/x").header("host", "b").body(()).unwrap();
        assert_eq!(authority_of(&req).as_deref(), Some("a.example:8080"));
        let req = Request::builder().uri("/x").header("host", "b:81").body(()).unwrap();
        assert_eq!(authority_of(&req).as_deref(), Some("b:81"));
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(authority_of(&req), None);
    }
}
