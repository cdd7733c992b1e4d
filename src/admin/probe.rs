//! The app's own HTTP and TCP probes, moved by injection onto the health port and run by the proxy over the pod's
//! own network, so they keep working when the app's ports accept only mesh mTLS.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::settings::{Action, AppProbe};

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
