//! Pooled upstream connections per endpoint: idle HTTP/1 connections are reused, HTTP/2 shares one multiplexed connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::ProxyBody;
use crate::errors::ProxyError;

/// Idle HTTP/1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<ProxyBody>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

struct Idle {
    since: Instant,
    tx: http1::SendRequest<ProxyBody>,
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool { idle: Default::default(), h2: Default::default(), connect_timeout, idle_timeout })
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
        self.h2.lock().expect("pool lock").retain(|_, tx| !tx.is_closed());
    }

    /// Sends `req` to `addr` over a pooled connection of `version`, returning the response as soon as its headers arrive.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        version: HttpVersion,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match version {
            HttpVersion::Http1 => self.send_h1(addr, req).await,
            HttpVersion::Http2 => self.send_h2(addr, req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        loop {
            let (mut tx, reused) = match self.checkout_h1(addr) {
                Some(tx) => (tx, true),
                None => (self.connect_h1(addr).await?, false),
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

    fn checkout_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < self.idle_timeout && conn.tx.is_ready() {
                return Some(conn.tx);
            }
        }
        None
    }

    /// Returns the connection to the pool once the response body has been read and it can take another request.
    fn recycle_h1(self: &Arc<Self>, addr: SocketAddr, mut tx: http1::SendRequest<ProxyBody>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                let mut idle = pool.idle.lock().expect("pool lock");
                let list = idle.entry(addr).or_default();
                list.retain(|c| !c.tx.is_closed());
                if list.len() < MAX_IDLE_PER_ENDPOINT {
                    list.push(Idle { since: Instant::now(), tx });
                }
            }
        });
    }

    async fn connect_h1(&self, addr: SocketAddr) -> Result<http1::SendRequest<ProxyBody>, ProxyError> {
        let io = self.connect(addr).await?;
        let (tx, conn) =
            http1::Builder::new().handshake(io).await.map_err(|source| ProxyError::UpstreamReset { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(tx)
    }

    async fn send_h2(&self, addr: SocketAddr, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        let existing = self.h2.lock().expect("pool lock").get(&addr).filter(|tx| !tx.is_closed()).cloned();
        let mut tx = match existing {
            Some(tx) => tx,
            None => {
                let tx = self.connect_h2(addr).await?;
                self.h2.lock().expect("pool lock").insert(addr, tx.clone());
                tx
            }
        };
        tx.ready().await.map_err(|source| ProxyError::UpstreamReset { addr, source })?;
        tx.send_request(req).await.map_err(|source| ProxyError::UpstreamReset { addr, source })
    }

    async fn connect_h2(&self, addr: SocketAddr) -> Result<http2::SendRequest<ProxyBody>, ProxyError> {
        let io = self.connect(addr).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(|source| ProxyError::UpstreamReset { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(tx)
    }

    /// Opens a TCP connection within the connect timeout.
    pub async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, ProxyError> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
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
}
