//! The listeners' side of the proxy: accept, detect the protocol, terminate mesh TLS (inbound), then serve HTTP or
//! forward opaque TCP.

pub mod detect;
pub mod drain;
mod http;
pub mod io;
pub mod open;
pub mod pool;
pub mod target;
mod tcp;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::direction::Direction;
use crate::discovery::snapshot::ConfigStore;
use crate::identity::tls::{self, Alpn, ClientHello, MeshTls};
use crate::settings::Settings;
use crate::stack::{self, Registries, Stack};
use crate::telemetry::metrics::Metrics;
use detect::{Protocol, Reason};
use drain::Drain;
use io::ConnIo;
use open::{ConnState, OpenConnections, OpenGuard, Responding};
use pool::Pool;
use target::ConnInfo;

/// How many bytes an accepted connection may queue in the kernel beyond what its peer has taken (`TCP_NOTSENT_LOWAT`):
/// a peer that stops reading (a SETTINGS or PING flood whose answers it never reads, a slow reader) then stops the
/// proxy's writes, and with them its reads, after this much instead of after the autotuned send buffer (up to
/// `tcp_wmem`'s maximum, 4 MiB by default, per connection).
const UNSENT_LIMIT: u32 = 128 * 1024;

/// How long an inbound connection that arrives before the first config waits for it before it is refused.
const INBOUND_CONFIG_WAIT: Duration = Duration::from_secs(10);

/// How long the inbound side waits for a mesh peer's ClientHello on an opaque (server-speaks-first) port before it
/// treats the connection as an unmeshed client's plaintext.
const OPAQUE_TLS_PEEK: Duration = Duration::from_millis(300);

/// HTTP/2 server limits (README, "Limits and timeouts").
const H2_MAX_STREAMS: u32 = 200;
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_LOCAL_RESETS: usize = 1024;
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The data plane's listeners and what their connections share: the live snapshot, mesh TLS, the upstream pool, the
/// stacks (built once) and the policies' state. Its methods: accepting and TCP here, HTTP in `http.rs`, destinations
/// in `target.rs`.
pub struct Listeners {
    pub settings: Arc<Settings>,
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub tls: Arc<MeshTls>,
    pool: Arc<Pool>,
    /// The policies' state that outlives config swaps (breakers, caps, budgets, balancers, rate limits).
    pub registries: Arc<Registries>,
    /// The HTTP stacks, built once (`stack.rs`).
    outbound: Stack,
    inbound: Stack,
    /// Trace context per hop and span export.
    tracer: crate::telemetry::trace::Tracer,
    /// The `source` label of outbound requests and the traces' service name: `name.namespace` of the first Service
    /// `FERRY_SERVICE` declares, or `app`.
    local_service: Arc<str>,
    /// Every listener address of this process: never dialled (loop protection).
    own_listeners: Arc<[SocketAddr]>,
    /// Open connections, for `/config_dump`.
    pub connections: Arc<OpenConnections>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// The caller Services peer proxies named (`http::SOURCE_HEADER`), as shared labels; bounded.
    claimed_sources: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
}

impl Listeners {
    pub fn new(
        settings: Arc<Settings>,
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
        drain: Drain,
        tls: Arc<MeshTls>,
    ) -> Arc<Self> {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(None) // ours covers the first request only; hyper's would also close idle keep-alive
            .max_buf_size(settings.max_header_bytes.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(settings.max_header_bytes.try_into().unwrap_or(u32::MAX))
            // Explicit, so that the README's limits table is what runs (these are hyper's and h2's defaults; the
            // reset limits are the rapid-reset and MadeYouReset defences).
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            // A peer that stops answering (a node gone without a FIN) is found out without waiting for the idle
            // timeout; PINGs are only sent on a connection that has been quiet for the interval.
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            // Upgrades (WebSocket) between proxies travel as extended CONNECT (RFC 8441).
            .enable_connect_protocol();
        let pool = Pool::new(settings.connect_timeout, settings.pool_idle_timeout, tls.clone(), metrics.clone());
        let local_service: Arc<str> = match settings.declared_services().first() {
            Some((ns, name)) => format!("{name}.{ns}").into(),
            None => "app".into(),
        };
        let own_listeners: Arc<[SocketAddr]> =
            [&settings.outbound_addrs[..], &settings.inbound_addrs[..], &[settings.admin_addr, settings.health_addr]]
                .concat()
                .into();
        let registries =
            Arc::new(Registries { mirrors_in_flight: settings.mirror_max_in_flight, ..Registries::default() });
        let limits = registries.limits.clone();
        let upstream =
            http::Upstream { pool: pool.clone(), own_listeners: own_listeners.clone(), limits, store: store.clone() };
        let outbound = stack::outbound::<http::Sent>(&registries, &metrics, upstream.clone().service());
        let inbound = stack::inbound::<http::Sent>(&registries, &metrics, upstream.service());
        let connections = Arc::new(OpenConnections::new(settings.max_connections));
        let tracer = crate::telemetry::trace::Tracer::new(
            settings.trace_sampling,
            settings.otlp_endpoint.clone(),
            local_service.to_string(),
            metrics.clone(),
        );
        Arc::new(Listeners {
            settings,
            store,
            metrics,
            drain,
            tls,
            pool,
            local_service,
            registries,
            outbound,
            inbound,
            tracer,
            own_listeners,
            connections,
            h1,
            h2,
            claimed_sources: Default::default(),
        })
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
                    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(UNSENT_LIMIT);
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
        let conn = match ConnInfo::of(&stream, peer, direction) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "accepted connection already gone");
                return;
            }
        };
        // At the listener's cap, room is made by closing the connection that least deserves its place; with every
        // one busy, the newcomer is refused.
        let state = Arc::new(ConnState::new(conn.activity.clone()));
        let open = match self.connections.admit(conn.clone(), state.clone()) {
            Ok((open, evicted)) => {
                if evicted {
                    self.metrics.tcp_evicted.with_label_values(&[direction.as_str()]).inc();
                }
                open
            }
            Err(e) => {
                self.metrics.tcp_failed.with_label_values(&[direction.as_str(), "overloaded"]).inc();
                tracing::warn!(%peer, direction = direction.as_str(), "connection refused: {e}");
                return;
            }
        };
        tokio::select! {
            () = self.clone().handle_admitted(stream, conn, &open, &state) => {}
            () = state.evicted.notified() => {
                tracing::debug!(%peer, direction = direction.as_str(), "connection closed to make room at the cap");
            }
        }
    }

    async fn handle_admitted(
        self: Arc<Self>,
        stream: TcpStream,
        conn: ConnInfo,
        open: &OpenGuard<'_>,
        state: &Arc<ConnState>,
    ) {
        let (peer, direction) = (conn.peer, conn.direction);
        // Fail closed: with a control plane, inbound traffic waits (bounded) until it has said what this pod serves,
        // and is refused if it does not; it is never served with no policy.
        if direction == Direction::Inbound
            && self.settings.control.is_some()
            && !self.store.wait_applied(INBOUND_CONFIG_WAIT).await
        {
            self.metrics.tcp_failed.with_label_values(&[direction.as_str(), "unauthorized"]).inc();
            tracing::warn!(%peer, "inbound connection refused: the control plane has not said yet what this pod serves");
            return;
        }
        let labels = [direction.as_str(), conn.mode.as_str()];
        let m = self.metrics.clone();
        m.tcp_opened.with_label_values(&labels).inc();
        m.tcp_open.with_label_values(&labels).inc();
        let mut io = ConnIo::new(stream).tracking(conn.activity.clone()).on_close(move |read, written| {
            m.tcp_closed.with_label_values(&labels).inc();
            m.tcp_open.with_label_values(&labels).dec();
            m.tcp_received_bytes.with_label_values(&labels).inc_by(read);
            m.tcp_sent_bytes.with_label_values(&labels).inc_by(written);
        });

        // The destination port, where it is known before reading: it may be an opaque (server-speaks-first) port.
        let target_port = match (direction, conn.original_dst) {
            (_, Some(original)) => Some(original.port()),
            (Direction::Inbound, None) => self.inbound_target().map(|t| t.port()),
            (Direction::Outbound, None) => None,
        };
        // An intercepted connection to an address this proxy does not know yet: asked about first (on demand), so
        // that its Service's ports (opaque or not) and endpoints are known when it is routed.
        if let (Direction::Outbound, Some(original)) = (direction, conn.original_dst)
            && self.store.on_demand.get().is_some()
            && self.store.load().route_original(original).is_none()
        {
            self.discover(ferry_api::protocol::Alias::Ip(original.ip())).await;
        }
        let start = Instant::now();
        let mut hello = None;
        let opaque = target_port.is_some_and(|p| self.is_opaque_port(direction, p));
        let (protocol, reason) = if opaque && direction == Direction::Outbound {
            (Protocol::Tcp, Reason::OpaquePort)
        } else {
            let timeout = match (direction, opaque) {
                // Inbound on an opaque port a mesh peer's ClientHello still comes first; a server-speaks-first client
                // sends nothing, so it is waited for only briefly (permissive mode; strict refuses such clients).
                (Direction::Inbound, true) => self.settings.detect_timeout.min(OPAQUE_TLS_PEEK),
                // An inbound port not declared opaque never hands bytes to the app unparsed because they came late: a
                // slow first byte is waited for as a slow header is, then the connection is closed (below).
                (Direction::Inbound, false) => self.settings.header_read_timeout,
                (Direction::Outbound, _) => self.settings.detect_timeout,
            };
            match detect::detect(&mut io, timeout).await {
                Ok((protocol, reason, prefix)) => {
                    if protocol == Protocol::Tls && direction == Direction::Inbound {
                        hello = tls::client_hello(&prefix);
                    }
                    io.replay(prefix);
                    match (opaque, protocol) {
                        (true, Protocol::Tls) => (Protocol::Tls, reason),
                        (true, _) => (Protocol::Tcp, Reason::OpaquePort),
                        (false, _) => (protocol, reason),
                    }
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "connection failed during protocol detection");
                    return;
                }
            }
        };
        self.metrics.detections.with_label_values(&[direction.as_str(), protocol.as_str(), reason.as_str()]).inc();
        self.metrics.detection_duration.with_label_values(&[direction.as_str()]).observe(start.elapsed().as_secs_f64());
        if direction == Direction::Inbound && !opaque && (protocol, reason) == (Protocol::Tcp, Reason::Timeout) {
            self.metrics.tcp_failed.with_label_values(&[direction.as_str(), "detect-timeout"]).inc();
            tracing::debug!(%peer, "inbound connection closed: nothing conclusive within the header-read timeout");
            return;
        }
        open.update(&conn, protocol.as_str());
        match protocol {
            Protocol::Http1 | Protocol::Http2 => self.serve_http(io, protocol, conn, state).await,
            Protocol::Tls if direction == Direction::Inbound => self.serve_tls(io, conn, hello, open, state).await,
            Protocol::Tls | Protocol::Tcp => {
                state.set_opaque();
                self.forward_tcp(io, conn).await
            }
        }
    }

    /// Inbound TLS: a mesh peer (a `ferry/*` ALPN) is authenticated and served; anything else is the app's own TLS
    /// from an unmeshed client, forwarded as opaque TCP (permissive).
    async fn serve_tls(
        self: &Arc<Self>,
        io: ConnIo,
        mut conn: ConnInfo,
        hello: Option<ClientHello>,
        open: &OpenGuard<'_>,
        conn_state: &Arc<ConnState>,
    ) {
        let inbound = Direction::Inbound.as_str();
        let Some(hello) = hello.filter(|h| h.mesh.is_some()) else {
            conn_state.set_opaque();
            return self.forward_tcp(io, conn).await;
        };
        let Some(state) = self.tls.current() else {
            self.metrics.tls_handshake_failures.with_label_values(&[inbound, "no-identity"]).inc();
            tracing::warn!(peer = %conn.peer, "mesh connection refused: this proxy holds no identity yet");
            return;
        };
        let accept = tokio_rustls::TlsAcceptor::from(state.server.clone()).accept(io);
        let stream = match tokio::time::timeout(self.settings.header_read_timeout, accept).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.metrics
                    .tls_handshake_failures
                    .with_label_values(&[inbound, crate::errors::handshake_reason(&e)])
                    .inc();
                tracing::info!(peer = %conn.peer, error = %e, "mesh TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls_handshake_failures.with_label_values(&[inbound, "timeout"]).inc();
                return;
            }
        };
        let session = stream.get_ref().1;
        let alpn = session.alpn_protocol().and_then(Alpn::of);
        let leaf = session.peer_certificates().and_then(|c| c.first());
        let info = match leaf.map(|c| ferry_api::identity::inspect(c)) {
            Some(Ok(info)) => info,
            other => {
                let message = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no client certificate".to_string(),
                };
                self.metrics.tls_handshake_failures.with_label_values(&[inbound, "bad-certificate"]).inc();
                tracing::info!(peer = %conn.peer, error = %message, "mesh peer refused");
                return;
            }
        };
        self.metrics.tls_handshakes.with_label_values(&[inbound]).inc();
        conn.sni_port = hello.server_name.as_deref().and_then(tls::sni_port);
        conn.peer_not_after = Some(info.not_after);
        tracing::debug!(peer = %conn.peer, identity = %info.identity, sni = ?hello.server_name, alpn = ?alpn, "mesh connection");
        conn.peer_spiffe = Some(info.identity.spiffe().into());
        conn.peer_identity = Some(Arc::new(info.identity));
        open.update(&conn, Protocol::Tls.as_str());
        match alpn {
            Some(Alpn::H2) => self.serve_http(stream, Protocol::Http2, conn, conn_state).await,
            // An opaque stream (a database session, say) is not cut when the peer's certificate expires: it was
            // authenticated when it opened, and cutting it would break long-lived streams at every rotation.
            Some(Alpn::Tcp) => {
                conn_state.set_opaque();
                self.forward_tcp(stream, conn).await
            }
            None => {}
        }
    }

    async fn serve_http<I>(self: &Arc<Self>, io: I, protocol: Protocol, conn: ConnInfo, state: &Arc<ConnState>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, direction) = (conn.peer, conn.direction);
        let expires = conn.peer_expires_in();
        let http1 = protocol == Protocol::Http1;
        let proxy = self.clone();
        if http1 {
            state.set_http1();
        }
        let conn_state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            conn_state.request_started();
            let proxy = proxy.clone();
            let conn = conn.clone();
            let state = conn_state.clone();
            // Boxed: the request's future is kilobytes (the stack's and on-demand discovery's states), and hyper moves
            // it into its connection's in-flight slot (HTTP/1) or into a task of its own per stream (HTTP/2): a box
            // is one allocation where each of those moves was a copy of the whole future.
            Box::pin(async move {
                let drain = proxy.drain.clone();
                let mut response = proxy.forward(req, conn).await;
                // Draining, an HTTP/1 client is told to close after this response (a close without it could cross
                // the client's next request on the wire).
                if http1 && drain.is_draining() && response.status() != ::http::StatusCode::SWITCHING_PROTOCOLS {
                    response
                        .headers_mut()
                        .insert(::http::header::CONNECTION, ::http::HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response.map(|body| Responding::new(body, state)))
            })
        });
        let io = TokioIo::new(io);
        let timers = Timers {
            header_deadline: http1.then_some(self.settings.header_read_timeout),
            expires,
            idle: self.settings.idle_timeout,
            drain_idle_grace: if http1 { DRAIN_IDLE_GRACE } else { Duration::ZERO },
        };
        let result = if http1 {
            let conn = self.h1.serve_connection(io, service).with_upgrades();
            let shutdown = http1::UpgradeableConnection::graceful_shutdown;
            drive(&self.drain, state, timers, conn, shutdown).await
        } else {
            let conn = self.h2.serve_connection(io, service);
            let shutdown = http2::Connection::graceful_shutdown;
            drive(&self.drain, state, timers, conn, shutdown).await
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

    /// What the inbound side enforces now on a connection or request delivered to the app's `port` (`Listeners::destination`
    /// finds it once per connection or request and hands it on in the `Destination`): the policy of the
    /// Services selecting that port. With `FERRY_APP_ADDR` (local mode: every port goes to one app address) the
    /// port says nothing, so every selecting Service's policy applies at once.
    pub fn inbound_policy(&self, port: u16) -> Arc<crate::policy::authz::InboundPolicy> {
        let port = self.settings.app_addr.is_none().then_some(port);
        self.store.load().inbound_policy(port).clone()
    }

    fn is_opaque_port(&self, direction: Direction, port: u16) -> bool {
        let snapshot = self.store.load();
        let selected = direction == Direction::Inbound && snapshot.inbound_policy(Some(port)).opaque;
        self.settings.opaque_ports.contains(&port) || selected || snapshot.is_opaque_port(port)
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

/// A server connection's timers.
struct Timers {
    /// HTTP/1: each request's headers must be complete within it: the first request's from the connection's start,
    /// the others' from their first byte (`ConnState::head_pending_for`, checked every half of it: a slow one is cut
    /// within 1 to 1.5 times it).
    header_deadline: Option<Duration>,
    /// A mesh peer's certificate runs out then.
    expires: Option<Duration>,
    /// No request in flight for this long (an idle keep-alive connection, an HTTP/2 connection that only sent its
    /// preface or only PINGs) winds the connection down gracefully, as the drain does; idle as long again, it is
    /// dropped. Checked every quarter of it.
    idle: Duration,
    /// HTTP/1 connections idle when the drain starts stay open this long for a request their client may be sending
    /// at that moment (answered with `Connection: close`); HTTP/2 needs none (its GOAWAY names the last stream).
    drain_idle_grace: Duration,
}

/// How long an idle HTTP/1 connection stays open once draining starts, for a request already on its way.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Runs a server connection until it ends. Draining (or the peer's certificate running out, or the idle timeout):
/// in-flight requests finish, HTTP/1 closes after the current response (an idle one after its next request, or
/// after `drain_idle_grace`), HTTP/2 sends GOAWAY. A connection that has
/// not sent its first request yet (accepted just before or during the drain) is given that request first, so no
/// request that reached the proxy is refused. The timers cost the request path nothing: one periodic check reads
/// what the connection's stream and requests recorded.
async fn drive<C: Future<Output = hyper::Result<()>>>(
    drain: &Drain,
    state: &ConnState,
    timers: Timers,
    conn: C,
    graceful_shutdown: fn(Pin<&mut C>),
) -> Result<(), ConnEnd> {
    tokio::pin!(conn);
    let far = Duration::MAX / 4;
    let first_deadline = tokio::time::sleep(timers.header_deadline.unwrap_or(far));
    tokio::pin!(first_deadline);
    let every = match timers.header_deadline {
        Some(limit) => (timers.idle / 4).min(limit / 2),
        None => timers.idle / 4,
    }
    .max(Duration::from_millis(50));
    let check = tokio::time::sleep(every);
    tokio::pin!(check);
    let (mut idle_mark, mut idle_since, mut idle_once) = (state.idle_mark(), tokio::time::Instant::now(), false);
    let stop = async {
        tokio::select! {
            _ = drain.signaled() => {}
            _ = tokio::time::sleep(timers.expires.unwrap_or(far)) => {}
        }
    };
    tokio::pin!(stop);
    let mut draining = false;
    // Draining an HTTP/1 connection that was idle: shut down once a request starts, or at this time.
    let mut close_at: Option<tokio::time::Instant> = None;
    loop {
        let before_first_request = state.requests.load(Ordering::Relaxed) == 0;
        tokio::select! {
            res = conn.as_mut() => return res.map_err(ConnEnd::Http),
            _ = &mut stop, if !draining => {
                draining = true;
                let idle = state.idle_mark().is_some();
                if idle && !before_first_request && !timers.drain_idle_grace.is_zero() {
                    close_at = Some(tokio::time::Instant::now() + timers.drain_idle_grace);
                } else if !before_first_request {
                    graceful_shutdown(conn.as_mut());
                }
            }
            () = tokio::time::sleep(Duration::from_millis(20)), if close_at.is_some() => {
                if state.idle_mark().is_none() || close_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    close_at = None;
                    graceful_shutdown(conn.as_mut());
                }
            }
            _ = state.first_request.notified(), if before_first_request => {
                if draining {
                    graceful_shutdown(conn.as_mut());
                }
            }
            _ = &mut first_deadline, if before_first_request && timers.header_deadline.is_some() => {
                return Err(ConnEnd::HeaderTimeout);
            }
            () = &mut check => {
                let now = tokio::time::Instant::now();
                if let Some(limit) = timers.header_deadline
                    && state.head_pending_for().is_some_and(|pending| pending >= limit)
                {
                    return Err(ConnEnd::HeaderTimeout);
                }
                let mark = state.idle_mark();
                if mark.is_none() || mark != idle_mark {
                    (idle_mark, idle_since) = (mark, now);
                } else if now - idle_since >= timers.idle {
                    // Twice idle: the graceful shutdown did not end it (an HTTP/2 peer that never answers the
                    // GOAWAY's PING, a request silent that long): dropped.
                    if idle_once {
                        return Ok(());
                    }
                    (idle_once, idle_since) = (true, now);
                    if !draining {
                        draining = true;
                        graceful_shutdown(conn.as_mut());
                    }
                }
                check.as_mut().reset(now + every);
            }
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
