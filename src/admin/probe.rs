//! The app's own HTTP and TCP probes, moved by injection onto the health port and run by the proxy over the pod's
//! own network, so they keep working when the app's ports accept only mesh mTLS.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// One rewritten probe: what the app's container asked the kubelet to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppProbe {
    pub port: u16,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// `GET path` with the probe's headers; the app's status is the answer (the kubelet takes 200-399 as success).
    Http { path: String, headers: Vec<(String, String)> },
    /// The app accepts a connection.
    Tcp,
}

/// The injector's JSON (`FERRY_APP_PROBES`): `{"/app-health/<container>/<kind>": {"httpGet"|"tcpSocket": <the
/// original action>, "port": <its number>}}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    port: u16,
    http_get: Option<HttpGet>,
    tcp_socket: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpGet {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    http_headers: Vec<Header>,
}

#[derive(Deserialize)]
struct Header {
    name: String,
    value: String,
}

/// Parses `FERRY_APP_PROBES`; the error says which entry is wrong.
pub fn parse(json: &str) -> Result<BTreeMap<String, AppProbe>, String> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON object of probes: {e}"))?;
    raw.into_iter()
        .map(|(path, value)| {
            if !path.starts_with("/app-health/") {
                return Err(format!("`{path}`: probe paths start with /app-health/"));
            }
            let wire: Wire = serde_json::from_value(value).map_err(|e| format!("`{path}`: {e}"))?;
            if wire.port == 0 {
                return Err(format!("`{path}`: port must be 1-65535"));
            }
            let action = match (wire.http_get, wire.tcp_socket) {
                (Some(get), None) => Action::Http {
                    path: get.path.filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into()),
                    headers: get.http_headers.into_iter().map(|h| (h.name, h.value)).collect(),
                },
                (None, Some(_)) => Action::Tcp,
                _ => return Err(format!("`{path}`: needs exactly one of httpGet and tcpSocket")),
            };
            Ok((path, AppProbe { port: wire.port, action }))
        })
        .collect()
}

/// Runs a probe against the app at `ip` (the pod's IP, as the kubelet would) and says what the kubelet should see.
pub async fn run(probe: &AppProbe, ip: IpAddr, limit: Duration) -> (StatusCode, String) {
    let addr = SocketAddr::new(ip, probe.port);
    match tokio::time::timeout(limit, check(probe, addr)).await {
        Ok(Ok(status)) => (status, format!("app answered {status}\n")),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("app probe to {addr} failed: {e}\n")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, format!("app probe to {addr} timed out after {limit:?}\n")),
    }
}

async fn check(probe: &AppProbe, addr: SocketAddr) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    // From the reserved source `ferry init` lets through: any other connection of the proxy's UID to the pod's own
    // address is sent to its inbound listener, where strict mTLS would refuse it.
    let stream = crate::listen::pool::dial(addr, crate::listen::pool::app_source(addr.ip())).await?;
    let Action::Http { path, headers } = &probe.action else { return Ok(StatusCode::OK) };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut req = Request::get(path.as_str())
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "kube-probe (ferry)");
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let response = send.send_request(req.body(Empty::<Bytes>::new())?).await?;
    let status = response.status();
    // The body is read (up to the end or an error) so the app sees a complete exchange, then dropped.
    let _ = response.into_body().collect().await;
    conn.abort();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injectors_json() {
        let json = r#"{"/app-health/web/live": {"httpGet": {"path": "/healthz", "port": "http",
                        "httpHeaders": [{"name": "X-Probe", "value": "liveness"}]}, "port": 8080},
                      "/app-health/web/ready": {"tcpSocket": {"port": 8080}, "port": 8080}}"#;
        let probes = parse(json).unwrap();
        assert_eq!(
            probes["/app-health/web/live"],
            AppProbe {
                port: 8080,
                action: Action::Http { path: "/healthz".into(), headers: vec![("X-Probe".into(), "liveness".into())] }
            }
        );
        assert_eq!(probes["/app-health/web/ready"].action, Action::Tcp);
        for (bad, want) in [
            ("[]", "not a JSON object"),
            (r#"{"/x": {"tcpSocket": {}, "port": 1}}"#, "start with /app-health/"),
            (r#"{"/app-health/a/live": {"port": 1}}"#, "exactly one of"),
            (r#"{"/app-health/a/live": {"tcpSocket": {}, "port": 0}}"#, "port must be"),
            (r#"{"/app-health/a/live": {"tcpSocket": {}, "port": 70000}}"#, "/app-health/a/live"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
