//! The health + metrics server (kubelet and Prometheus) and the localhost-only admin server.

pub mod probe;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::discovery::snapshot::ConfigStore;
use crate::listen::drain::Drain;
use crate::listen::open::{ConnState, OpenConnections};
use crate::settings::Settings;
use crate::telemetry::logging::LogHandle;
use crate::telemetry::metrics::Metrics;

/// Startup, readiness and liveness as DESIGN.md defines them.
pub struct Health {
    listeners_bound: AtomicBool,
    started: AtomicBool,
    needs_config: bool,
    /// With a control plane: startup waits for a workload identity (and trust bundle).
    needs_identity: Option<Arc<crate::identity::tls::MeshTls>>,
}

impl Health {
    pub fn new(needs_config: bool, needs_identity: Option<Arc<crate::identity::tls::MeshTls>>) -> Self {
        Health {
            listeners_bound: AtomicBool::new(false),
            started: AtomicBool::new(false),
            needs_config,
            needs_identity,
        }
    }

    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::SeqCst);
    }

    /// Listeners bound, a config applied (when a source is configured) and an identity held (with a control plane);
    /// once true it stays true.
    pub fn started(&self, store: &ConfigStore) -> bool {
        if self.started.load(Ordering::SeqCst) {
            return true;
        }
        let now = self.listeners_bound.load(Ordering::SeqCst)
            && (!self.needs_config || store.applied())
            && self.needs_identity.as_ref().is_none_or(|tls| tls.current().is_some());
        if now {
            self.started.store(true, Ordering::SeqCst);
        }
        now
    }
}

/// What both servers read.
pub struct AdminState {
    pub settings: Arc<Settings>,
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub health: Arc<Health>,
    pub log: Option<LogHandle>,
    pub connections: Arc<OpenConnections>,
    /// Per-endpoint load and outlier state, for `/endpoints`.
    pub balancers: Arc<crate::policy::balance::Balancers>,
}

type Body = Full<Bytes>;

/// The longest an app probe may take here; the kubelet's own `timeoutSeconds` usually ends it sooner.
const APP_PROBE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    reply(status, "text/plain; charset=utf-8", body)
}

fn json(value: &serde_json::Value) -> Response<Body> {
    reply(StatusCode::OK, "application/json", serde_json::to_vec_pretty(value).expect("serializable"))
}

impl AdminState {
    async fn health(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let started = self.health.started(&self.store);
        let probe = |ok: bool, what: &str| {
            if ok {
                text(StatusCode::OK, format!("{what}\n"))
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not {what}\n"))
            }
        };
        match req.uri().path() {
            "/health/live" => text(StatusCode::OK, "live\n"),
            "/health/startup" => probe(started, "started"),
            "/health/ready" => probe(started && !self.drain.is_draining(), "ready"),
            "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4", self.metrics.encode()),
            path if path.starts_with("/app-health/") => match self.settings.app_probes.get(path) {
                Some(probe) => {
                    let (status, body) = crate::admin::probe::run(probe, self.settings.pod_ip, APP_PROBE_LIMIT).await;
                    text(status, body)
                }
                None => text(StatusCode::NOT_FOUND, format!("no app probe at {path} (FERRY_APP_PROBES)\n")),
            },
            _ => text(StatusCode::NOT_FOUND, "try /health/live, /health/ready, /health/startup or /metrics\n"),
        }
    }

    async fn admin(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method().clone(), req.uri().path()) {
            (Method::GET, "/config_dump") => {
                let snapshot = self.store.load();
                json(&serde_json::json!({
                    "bootstrap": &*self.settings,
                    "snapshot": &**snapshot,
                    "draining": self.drain.is_draining(),
                    "in_flight_connections": self.drain.in_flight(),
                    // Each open connection with the mode it arrived by (explicit or transparent) and its protocol.
                    "connections": self.connections.list(),
                    // On-demand discovery: what this proxy subscribed to, and the answers.
                    "onDemand": self.store.on_demand.get().map(|od| od.dump()),
                }))
            }
            (Method::GET, "/endpoints") => {
                let snapshot = self.store.load();
                let services: Vec<_> = snapshot
                    .services
                    .iter()
                    .map(|s| {
                        let ports: Vec<_> = s
                            .spec
                            .ports
                            .iter()
                            .map(|p| {
                                // The balancer's view once it has sent there: latency, in flight, ejections.
                                let endpoints = match self.balancers.state(&s.qualified_name, p.port) {
                                    Some(state) => serde_json::json!(state),
                                    None => serde_json::json!(
                                        s.endpoints(p.port)
                                            .map(|address| serde_json::json!({"address": address}))
                                            .collect::<Vec<_>>()
                                    ),
                                };
                                serde_json::json!({"port": p.port, "endpoints": endpoints})
                            })
                            .collect();
                        serde_json::json!({"service": &*s.qualified_name, "ports": ports})
                    })
                    .collect();
                json(&serde_json::json!({ "version": snapshot.version, "services": services }))
            }
            (Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested on the admin port");
                // Start a moment later, so that this answer is written before an idle proxy exits.
                let drain = self.drain.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    drain.start();
                });
                text(StatusCode::ACCEPTED, "draining\n")
            }
            (Method::PUT, "/log_level") => {
                let query_level = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")).map(str::to_string));
                let level = match query_level {
                    Some(l) => l,
                    None => match Limited::new(req.into_body(), 4096).collect().await {
                        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
                        Err(_) => {
                            return text(StatusCode::PAYLOAD_TOO_LARGE, "log level too long\n");
                        }
                    },
                };
                let Some(log) = &self.log else {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "logging is not managed by this process\n");
                };
                match log.set_level(&level) {
                    Ok(()) => {
                        tracing::info!(level = %level, "log level changed");
                        text(StatusCode::OK, format!("log level: {level}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid log level `{level}`: {e}\n")),
                }
            }
            (_, "/config_dump" | "/endpoints" | "/shutdown" | "/log_level") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET /config_dump, GET /endpoints, POST /shutdown, PUT /log_level\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "GET /config_dump, GET /endpoints, POST /shutdown, PUT /log_level\n"),
        }
    }
}

#[derive(Clone, Copy)]
pub enum Server {
    Health,
    Admin,
}

/// Connections each of the two small servers keeps open: the kubelet and Prometheus need a few.
const MAX_CONNECTIONS: usize = 128;

/// Serves one of the two small HTTP/1 servers on `listener` for the life of the process.
pub async fn serve(state: Arc<AdminState>, listener: TcpListener, which: Server) {
    // Capped as the listeners are: at the cap the oldest connection without a request in flight makes room, so that
    // idle sockets held open cannot keep the kubelet's probes out.
    let open = Arc::new(OpenConnections::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(info) = crate::listen::target::ConnInfo::of(&stream, peer, crate::direction::Direction::Inbound) else {
            continue;
        };
        let conn = Arc::new(ConnState::default());
        let state = state.clone();
        let header_timeout = state.settings.header_read_timeout;
        let open = open.clone();
        tokio::spawn(async move {
            let Ok((_open, _)) = open.admit(info, conn.clone()) else {
                return;
            };
            let evicted = conn.clone();
            let service = hyper::service::service_fn(move |req| {
                let (state, conn) = (state.clone(), conn.clone());
                conn.request_started();
                async move {
                    let response = match which {
                        Server::Health => state.health(req).await,
                        Server::Admin => state.admin(req).await,
                    };
                    conn.request_finished();
                    Ok::<_, Infallible>(response)
                }
            });
            // Bounded like the listeners: headers within the header-read timeout, which here also closes a
            // keep-alive connection idle that long (the kubelet and Prometheus reconnect).
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            tokio::select! {
                _ = http.serve_connection(TokioIo::new(stream), service) => {}
                () = evicted.evicted.notified() => {}
            }
        });
    }
}
