//! Pooled upstream connections per endpoint: idle HTTP/1 connections are reused, HTTP/2 shares one multiplexed
//! connection; to a meshed endpoint every request travels over one mTLS HTTP/2 connection (per endpoint and target
//! port), which takes no new requests once this proxy's certificate or trust bundle has changed.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use crate::body::ProxyBody;
use crate::direction::Direction;
use crate::errors::ProxyError;
use crate::identity::tls::{Alpn, MeshTls, PeerTls};
use crate::policy::concurrency::ConnectionLimit;
use crate::telemetry::metrics::Metrics;
use crate::util::FastMap;

/// Idle HTTP/1 connections kept per endpoint (connections still reading a response are listed besides these).
const MAX_IDLE_PER_ENDPOINT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// A pooled HTTP/2 connection: plaintext per endpoint; mTLS per endpoint, SNI and the identities the peer was checked
/// against (a change of the Service's identities means new connections), with the TLS generation it was made with.
type H2Key = (SocketAddr, Option<PeerTls>);

pub struct Pool {
    idle: Mutex<FastMap<SocketAddr, Vec<Idle>>>,
    h2: Mutex<FastMap<H2Key, (http2::SendRequest<ProxyBody>, u64)>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    tls: Arc<MeshTls>,
    metrics: Arc<Metrics>,
}

/// A slot of the destination's `maxConnections`, held by a connection while it is open (`None`: no limit).
type Slot = Option<tokio::sync::OwnedSemaphorePermit>;

fn admit(limit: Option<&ConnectionLimit>) -> Result<Slot, ProxyError> {
    limit.map(ConnectionLimit::admit).transpose()
}

/// A listed HTTP/1 connection: idle, or still reading the response it was listed at.
struct Idle {
    /// When it was listed (its last response's headers arrived); the idle timeout counts from here, so a connection
    /// whose response body took longer than the idle timeout is not reused.
    since: Instant,
    tx: http1::SendRequest<ProxyBody>,
}

impl Pool {
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: Arc<MeshTls>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Pool { idle: Default::default(), h2: Default::default(), connect_timeout, idle_timeout, tls, metrics })
    }

    /// Drops idle connections that expired or were closed by the peer, every half idle timeout (1 s to 30 s), so that
    /// endpoints that left the config do not keep connections forever.
    pub async fn sweep_forever(self: Arc<Self>) {
        let period = (self.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::time::sleep(period).await;
            self.sweep();
        }
    }

    fn sweep(&self) {
        self.idle.lock().expect("pool lock").retain(|_, list| {
            list.retain(|c| !c.tx.is_closed() && c.since.elapsed() < self.idle_timeout);
            !list.is_empty()
        });
        let generation = self.tls.current().map(|s| s.generation);
        self.h2
            .lock()
            .expect("pool lock")
            .retain(|(_, peer), (tx, g)| !tx.is_closed() && (peer.is_none() || Some(*g) == generation));
    }

    /// Sends `req` to `addr` over a pooled connection of `version` (always HTTP/2 over mTLS to a meshed peer),
    /// returning the response as soon as its headers arrive.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        version: HttpVersion,
        tls: Option<&PeerTls>,
        limit: Option<&ConnectionLimit>,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match (tls, version) {
            (Some(peer), _) => self.send_h2(addr, Some(peer), limit, req).await,
            (None, HttpVersion::Http1) => self.send_h1(addr, limit, req).await,
            (None, HttpVersion::Http2) => self.send_h2(addr, None, limit, req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        limit: Option<&ConnectionLimit>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        loop {
            let (mut tx, reused) = match self.checkout_h1(addr) {
                Some(tx) => (tx, true),
                // Boxed, as below: the connect's state is kilobytes that a reused connection should not carry.
                None => (Box::pin(self.connect_h1(addr, admit(limit)?)).await?, false),
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    self.recycle_h1(addr, tx);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // A reused connection the server had closed before our request went out: try a fresh one.
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        return Err(ProxyError::UpstreamReset { addr, source: e.into_error() });
                    }
                },
            }
        }
    }

    /// The most recently listed connection of `addr` that can take a request now. Expired and closed ones are dropped;
    /// one whose previous response is still being read stays listed.
    fn checkout_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            if list[i].tx.is_closed() || now.duration_since(list[i].since) >= self.idle_timeout {
                list.remove(i);
            } else if list[i].tx.is_ready() {
                return Some(list.remove(i).tx);
            }
        }
        None
    }

    /// Lists the connection again as soon as its response's headers arrived: it takes the next request once the
    /// body has been read, which `checkout_h1` sees (no task waits for that per request). Only idle connections count
    /// against `MAX_IDLE_PER_ENDPOINT`; busy ones are at most the connections open. A connection dropped while busy
    /// (expired) finishes its response and then closes.
    fn recycle_h1(&self, addr: SocketAddr, tx: http1::SendRequest<ProxyBody>) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(addr).or_default();
        list.retain(|c| !c.tx.is_closed());
        if list.iter().filter(|c| c.tx.is_ready()).count() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle { since: Instant::now(), tx });
        }
    }

    async fn connect_h1(&self, addr: SocketAddr, slot: Slot) -> Result<http1::SendRequest<ProxyBody>, ProxyError> {
        let io = self.connect(addr).await?;
        let (tx, conn) =
            http1::Builder::new().handshake(io).await.map_err(|source| ProxyError::UpstreamReset { addr, source })?;
        tokio::spawn(async move {
            // The connection holds its slot of the destination's `maxConnections` until it closes.
            let _slot = slot;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(tx)
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        tls: Option<&PeerTls>,
        limit: Option<&ConnectionLimit>,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let key = (addr, tls.cloned());
        // A mesh connection made with an older certificate or bundle finishes its streams but takes no new ones.
        let generation = match tls {
            Some(_) => self.tls.current().map(|s| s.generation).unwrap_or(0),
            None => 0,
        };
        let existing = self
            .h2
            .lock()
            .expect("pool lock")
            .get(&key)
            .filter(|(tx, g)| !tx.is_closed() && *g == generation)
            .map(|(tx, _)| tx.clone());
        let mut tx = match existing {
            Some(tx) => tx,
            None => {
                let slot = admit(limit)?;
                // Boxed: the connect and the TLS and HTTP/2 handshakes are kilobytes of state, which would otherwise
                // make every request's future (allocated and moved once per request) that large.
                let (tx, generation) = Box::pin(async {
                    match tls {
                        Some(peer) => {
                            let (io, generation) = self.connect_mesh(addr, peer, Alpn::H2).await?;
                            Ok::<_, ProxyError>((self.handshake_h2(addr, io, slot).await?, generation))
                        }
                        None => Ok((self.handshake_h2(addr, self.connect(addr).await?, slot).await?, 0)),
                    }
                })
                .await?;
                self.h2.lock().expect("pool lock").insert(key, (tx.clone(), generation));
                tx
            }
        };
        tx.ready().await.map_err(|source| ProxyError::UpstreamReset { addr, source })?;
        tx.send_request(req).await.map_err(|source| ProxyError::UpstreamReset { addr, source })
    }

    async fn handshake_h2<I>(
        &self,
        addr: SocketAddr,
        io: I,
        slot: Slot,
    ) -> Result<http2::SendRequest<ProxyBody>, ProxyError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(|source| ProxyError::UpstreamReset { addr, source })?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(tx)
    }

    /// Opens a TCP connection within the connect timeout.
    /// A plaintext connection to the pod's own (non-loopback) address is the delivery of inbound traffic to the app:
    /// it is made from the reserved source that `ferry init`'s rules let through (see [`app_source`]).
    pub async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, ProxyError> {
        self.dial(addr, app_source(addr.ip())).await
    }

    async fn dial(&self, addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ProxyError> {
        match tokio::time::timeout(self.connect_timeout, dial(addr, source)).await {
            Err(_) => Err(ProxyError::ConnectTimeout(addr)),
            Ok(Err(source)) => Err(ProxyError::ConnectRefused { addr, source }),
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, ProxyError> {
        self.connect_tcp(addr).await.map(TokioIo::new)
    }

    /// Opens an mTLS connection to a meshed peer (the handshake within the connect timeout) and checks its identity.
    /// Returns it with the TLS generation it was made with.
    pub async fn connect_mesh(
        &self,
        addr: SocketAddr,
        peer: &PeerTls,
        alpn: Alpn,
    ) -> Result<(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, u64), ProxyError> {
        let tcp = self.dial(addr, None).await?;
        let outbound = Direction::Outbound.as_str();
        match tokio::time::timeout(self.connect_timeout, self.tls.connect(tcp, addr, peer, alpn)).await {
            Err(_) => {
                self.metrics.tls_handshake_failures.with_label_values(&[outbound, "timeout"]).inc();
                Err(ProxyError::ConnectTimeout(addr))
            }
            Ok(Err(e)) => {
                self.metrics.tls_handshake_failures.with_label_values(&[outbound, e.reason()]).inc();
                tracing::warn!(%addr, error = %e, "mesh TLS connection refused");
                Err(ProxyError::Tls(e))
            }
            Ok(Ok((stream, generation))) => {
                self.metrics.tls_handshakes.with_label_values(&[outbound]).inc();
                Ok((TokioIo::new(stream), generation))
            }
        }
    }
}

/// Dials `addr`, from `source` when given.
pub async fn dial(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else { return TcpStream::connect(addr).await };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
        let hint = if source.is_ipv6() { " (`ferry init` puts it on lo)" } else { "" };
        std::io::Error::new(e.kind(), format!("binding the app-delivery source {source}{hint}: {e}"))
    })?;
    socket.connect(addr).await
}

/// The source address the proxy dials its own app from when the app is at one of the pod's own non-loopback
/// addresses (transparent inbound delivers to the address the caller dialled): 127.0.0.6 or ::6, which `ferry init`
/// lets through, where any other connection of the proxy's UID to the pod's address goes to its inbound listener. The
/// app sees this address as the caller's. `None` for loopback and for addresses that are not this host's.
pub fn app_source(ip: IpAddr) -> Option<IpAddr> {
    let family = if ip.is_ipv4() { crate::init::Family::V4 } else { crate::init::Family::V6 };
    (!ip.is_loopback() && !ip.is_unspecified() && super::target::is_local_ip(ip)).then(|| family.inbound_source())
}
