//! Opaque TCP: a connection that is not HTTP (or is on an opaque port) is authorized and rate-limited once (inbound),
//! its endpoint chosen once by the load balancer and held within the destination's `maxConnections`, and its bytes
//! copied both ways (half-close kept), over mTLS to a meshed endpoint.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Listeners;
use super::io::Activity;
use super::target::ConnInfo;
use crate::direction::Direction;
use crate::identity::tls::Alpn;

impl Listeners {
    pub(super) async fn forward_tcp<I>(&self, mut io: I, conn: ConnInfo)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let direction = conn.direction;
        let dest = match self.destination(&conn, None, None) {
            Ok(dest) => dest,
            Err((service, e)) => return self.tcp_not_forwarded(direction, &service, e),
        };
        if direction == Direction::Inbound {
            let call = crate::policy::authz::Call {
                peer: conn.peer_identity.as_deref(),
                method: None,
                path: None,
                port: dest.port,
            };
            let policy = dest.inbound.clone().expect("an inbound destination carries its port's policy (destination)");
            // A port declared HTTP takes HTTP only: an opaque stream (a mesh peer's `ferry/tcp`, bytes that are not
            // HTTP) would carry requests past header stripping, rate limits and path rules.
            if policy.declared_http {
                self.metrics.proxy_error(direction, "bad-request");
                self.metrics.tcp_failed.with_label_values(&[direction.as_str(), "declared-http"]).inc();
                tracing::info!(peer = %conn.peer, port = dest.port, "opaque connection refused: the port is declared HTTP");
                return;
            }
            if let crate::policy::authz::Decision::Deny(why) = policy.check(&call, &self.metrics) {
                self.metrics.proxy_error(direction, "unauthorized");
                self.metrics.tcp_failed.with_label_values(&[direction.as_str(), "unauthorized"]).inc();
                tracing::info!(peer = %conn.peer, port = dest.port, "opaque connection refused: {why}");
                return;
            }
            // A connection spends a token from each selecting Service's bucket, as a request does.
            let caller = conn.peer_identity.as_deref();
            if self.registries.rate_limits.admit(&policy.rate_limits, caller, &self.metrics).is_err() {
                self.metrics.proxy_error(direction, "rate-limited");
                self.metrics.tcp_failed.with_label_values(&[direction.as_str(), "rate-limited"]).inc();
                tracing::info!(peer = %conn.peer, port = dest.port, "opaque connection refused: over the rate limit");
                return;
            }
        }
        // A Service's endpoint is chosen as for a request (connecting is the try judged), once per connection.
        let (endpoint, attempt) = match dest.fixed_or_choice() {
            Ok(endpoint) => (endpoint, None),
            Err(choice) => match self.registries.balancers.start(&choice, &mut Vec::new()) {
                Ok((endpoint, attempt)) => (endpoint, Some(attempt)),
                Err(e) => return self.tcp_not_forwarded(direction, &dest.service, e),
            },
        };
        if let Err(e) = super::target::not_own_listener(&self.own_listeners, endpoint.addr) {
            return self.tcp_not_forwarded(direction, &dest.service, e);
        }
        let target = endpoint.addr;
        // The connection holds a slot of the destination's `maxConnections` while it is open.
        let limit = dest.outbound.caps.map(|caps| self.registries.limits.connections(&dest.service, caps));
        let _slot = match limit.as_ref().map(|l| l.admit()).transpose() {
            Ok(slot) => slot,
            Err(e) => return self.tcp_not_forwarded(direction, &dest.service, e),
        };
        tracing::debug!(peer = %conn.peer, mode = conn.mode.as_str(), service = %dest.service, %target, mtls = dest.tls_for(&endpoint).is_some(), "opaque connection");
        let connected = match dest.tls_for(&endpoint) {
            Some(peer) => self
                .pool
                .connect_mesh(target, peer, Alpn::Tcp)
                .await
                .map(|(s, _)| Upstream::Mesh(Box::new(s.into_inner()))),
            None => self.pool.connect_tcp(target).await.map(Upstream::Plain),
        };
        if let Some(attempt) = attempt {
            attempt.finish(connected.is_err(), &self.metrics);
        }
        // The destination Service's own idle timeout (inbound: the selecting Services'), else the proxy's.
        let service_idle = match &dest.inbound {
            Some(policy) => policy.tcp_idle_timeout,
            None => dest.outbound.tcp_idle_timeout,
        };
        let (activity, idle) = (&conn.activity, service_idle.unwrap_or(self.settings.idle_timeout));
        let copied = match connected {
            Ok(Upstream::Mesh(mut upstream)) => copy_until_idle(&mut io, &mut upstream, activity, idle).await,
            Ok(Upstream::Plain(mut upstream)) => copy_until_idle(&mut io, &mut upstream, activity, idle).await,
            Err(e) => return self.tcp_not_forwarded(direction, &dest.service, e),
        };
        if let Err(e) = copied {
            tracing::debug!(%target, error = %e, "opaque connection ended with an error");
        }
    }

    fn tcp_not_forwarded(&self, direction: Direction, service: &str, e: crate::errors::ProxyError) {
        self.metrics.proxy_error(direction, e.reason());
        self.metrics.tcp_failed.with_label_values(&[direction.as_str(), e.reason()]).inc();
        tracing::warn!(service, error = %e, "opaque connection not forwarded");
    }
}

/// Copies both ways until both sides end (copy_bidirectional shuts down each write side when its read side ends:
/// half-close is kept), or until no bytes have moved either way for `idle`, which closes both.
async fn copy_until_idle<A, B>(a: &mut A, b: &mut B, activity: &Activity, idle: Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        copied = tokio::io::copy_bidirectional(a, b) => copied.map(drop),
        () = activity.quiet_for(idle) => {
            tracing::debug!("opaque connection closed: idle");
            Ok(())
        }
    }
}

/// An opaque connection's upstream side.
enum Upstream {
    Plain(TcpStream),
    Mesh(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}
