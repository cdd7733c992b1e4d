//! The listeners' side of the proxy: accept, detect the protocol, then serve HTTP or forward opaque TCP.

pub mod body;
mod http;
pub mod pool;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::bootstrap::Settings;
use crate::detect::{self, Protocol, Reason};
use crate::drain::Drain;
use crate::io::ConnIo;
use crate::metrics::Metrics;
use crate::snapshot::ConfigStore;
use pool::Pool;

pub use self::http::{is_grpc, strip_hop_by_hop};

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound = 0,
    Outbound = 1,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

pub struct Proxy {
    pub settings: Arc<Settings>,
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pool: Arc<Pool>,
    /// The `service` label of inbound requests: `FERRY_SERVICE.FERRY_NAMESPACE`, or `app`.
    local_service: Arc<str>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Proxy {
    pub fn new(settings: Arc<Settings>, store: Arc<ConfigStore>, metrics: Arc<Metrics>, drain: Drain) -> Arc<Self> {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(None) // ours covers the first request only; hyper's would also close idle keep-alive
            .max_buf_size(settings.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_header_list_size(settings.max_header_bytes.try_into().unwrap_or(u32::MAX));
        let pool = Pool::new(settings.connect_timeout, settings.pool_idle_timeout);
        let local_service = match &settings.service {
            Some(name) => format!("{name}.{}", settings.namespace).into(),
            None => "app".into(),
        };
        Arc::new(Proxy { settings, store, metrics, drain, pool, local_service, h1, h2 })
    }

    /// Keeps the upstream connection pool tidy for the life of the process.
    pub async fn sweep_idle_connections(self: Arc<Self>) {
        self.pool.clone().sweep_forever().await
    }

    /// Accepts connections until the process exits; the inbound listener stops accepting when draining starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, direction: Direction) {
        let local = listener.local_addr().ok();
        let drained = async {
            match direction {
                Direction::Inbound => self.drain.signaled().await,
                Direction::Outbound => std::future::pending().await,
            }
        };
        tokio::pin!(drained);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = &mut drained => {
                    tracing::info!(addr = ?local, "draining: inbound listener closed");
                    return;
                }
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(self.clone().handle(stream, peer, direction));
                }
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(addr = ?local, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, direction: Direction) {
        let _in_flight = self.drain.track();
        let d = direction.as_str();
        let m = self.metrics.clone();
        m.tcp_opened.with_label_values(&[d]).inc();
        m.tcp_open.with_label_values(&[d]).inc();
        let mut io = ConnIo::new(stream).on_close(move |read, written| {
            m.tcp_closed.with_label_values(&[d]).inc();
            m.tcp_open.with_label_values(&[d]).dec();
            m.tcp_received_bytes.with_label_values(&[d]).inc_by(read);
            m.tcp_sent_bytes.with_label_values(&[d]).inc_by(written);
        });

        let target = match direction {
            Direction::Inbound => self.inbound_target(),
            // Explicit mode only: transparent interception (original destination) comes with `ferry init`.
            Direction::Outbound => None,
        };
        let opaque = target.is_some_and(|t| self.is_opaque_port(t.port()));
        let start = Instant::now();
        let (protocol, reason) = if opaque {
            (Protocol::Tcp, Reason::OpaquePort)
        } else {
            match detect::detect(&mut io, self.settings.detect_timeout).await {
                Ok((protocol, reason, prefix)) => {
                    io.replay(prefix);
                    (protocol, reason)
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "connection failed during protocol detection");
                    return;
                }
            }
        };
        self.metrics.detections.with_label_values(&[d, protocol.as_str(), reason.as_str()]).inc();
        self.metrics.detection_duration.with_label_values(&[d]).observe(start.elapsed().as_secs_f64());

        match protocol {
            Protocol::Http1 | Protocol::Http2 => self.serve_http(io, protocol, peer, direction).await,
            Protocol::Tcp => match target {
                Some(target) => self.forward_tcp(io, target, direction).await,
                None => {
                    self.metrics.proxy_error(direction, "no-route");
                    tracing::warn!(%peer, direction = d, "opaque connection has no destination (explicit mode routes HTTP only); closed");
                }
            },
        }
    }

    async fn serve_http(self: &Arc<Self>, io: ConnIo, protocol: Protocol, peer: SocketAddr, direction: Direction) {
        let state = Arc::new(ConnState::default());
        let proxy = self.clone();
        let conn_state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            conn_state.request_started();
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.forward(req, direction, peer).await) }
        });
        let io = TokioIo::new(io);
        let result = if protocol == Protocol::Http2 {
            let conn = self.h2.serve_connection(io, service);
            drive(&self.drain, &state, None, conn, http2::Connection::graceful_shutdown).await
        } else {
            let conn = self.h1.serve_connection(io, service).with_upgrades();
            let header_deadline = Some(self.settings.header_read_timeout);
            drive(&self.drain, &state, header_deadline, conn, http1::UpgradeableConnection::graceful_shutdown).await
        };
        let bad_input = match &result {
            Ok(()) => return,
            Err(ConnEnd::HeaderTimeout) => true,
            Err(ConnEnd::Http(e)) => is_bad_input(e),
        };
        if bad_input {
            self.metrics.proxy_error(direction, "bad-request");
            tracing::info!(%peer, direction = direction.as_str(), error = %result.unwrap_err(), "bad request; connection closed");
        } else if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    async fn forward_tcp(&self, mut io: ConnIo, target: SocketAddr, direction: Direction) {
        let mut upstream = match self.pool.connect_tcp(target).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.proxy_error(direction, e.reason());
                tracing::warn!(%target, error = %e, "opaque connection not forwarded");
                return;
            }
        };
        // copy_bidirectional shuts down each write side when its read side ends: half-close is kept.
        if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
            tracing::debug!(%target, error = %e, "opaque connection ended with an error");
        }
    }

    /// Inbound traffic goes to `FERRY_APP_ADDR`, else to the local service's single port on localhost.
    pub fn inbound_target(&self) -> Option<SocketAddr> {
        if let Some(addr) = self.settings.app_addr {
            return Some(addr);
        }
        let snapshot = self.store.load();
        let service = snapshot.service(self.settings.service.as_deref()?, &self.settings.namespace)?;
        match service.spec.ports.as_slice() {
            [port] => Some(SocketAddr::from(([127, 0, 0, 1], port.target_port.unwrap_or(port.port)))),
            _ => None,
        }
    }

    fn is_opaque_port(&self, port: u16) -> bool {
        self.settings.opaque_ports.contains(&port) || self.store.load().is_opaque_port(port)
    }
}

/// What the drain needs to know about one server connection.
#[derive(Default)]
struct ConnState {
    requests: AtomicUsize,
    first_request: Notify,
}

impl ConnState {
    fn request_started(&self) {
        if self.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            // notify_one keeps a permit if nobody waits yet.
            self.first_request.notify_one();
        }
    }
}

/// How a server connection ended, when not cleanly.
#[derive(Debug, thiserror::Error)]
enum ConnEnd {
    #[error(transparent)]
    Http(hyper::Error),
    #[error("the client did not send complete request headers within the header-read timeout")]
    HeaderTimeout,
}

/// Runs a server connection until it ends.
/// - `header_deadline`: the first request's headers must be complete within it (HTTP/1 slow-header defence).
/// - Draining: in-flight requests finish, HTTP/1 closes after the current response, HTTP/2 sends GOAWAY. A
///   connection that has not sent its first request yet (accepted just before or during the drain) is given that
///   request first, so no request that reached the proxy is refused.
async fn drive<C: Future<Output = hyper::Result<()>>>(
    drain: &Drain,
    state: &ConnState,
    header_deadline: Option<Duration>,
    conn: C,
    graceful_shutdown: fn(Pin<&mut C>),
) -> Result<(), ConnEnd> {
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(header_deadline.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut draining = false;
    loop {
        let before_first_request = state.requests.load(Ordering::Relaxed) == 0;
        tokio::select! {
            res = conn.as_mut() => return res.map_err(ConnEnd::Http),
            _ = drain.signaled(), if !draining => {
                draining = true;
                if !before_first_request {
                    graceful_shutdown(conn.as_mut());
                }
            }
            _ = state.first_request.notified(), if before_first_request => {
                if draining {
                    graceful_shutdown(conn.as_mut());
                }
            }
            _ = &mut deadline, if before_first_request && header_deadline.is_some() => return Err(ConnEnd::HeaderTimeout),
        }
    }
}

/// Whether a server connection ended because the client sent something malformed or too slow.
fn is_bad_input(e: &hyper::Error) -> bool {
    if e.is_parse() || e.is_parse_too_large() || e.is_timeout() || e.is_parse_status() {
        return true;
    }
    // HTTP/2: a protocol error we detected (garbage after the preface, bad frames).
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_library() && h2.reason() != Some(h2::Reason::NO_ERROR);
        }
        source = s.source();
    }
    false
}
