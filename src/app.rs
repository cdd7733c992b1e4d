//! Wires the proxy together: config source, listeners, health/admin servers, and the drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

use crate::admin::{self, AdminState, Health};
use crate::direction::Direction;
use crate::discovery::file;
use crate::discovery::snapshot::ConfigStore;
use crate::identity::tls::MeshTls;
use crate::listen::Listeners;
use crate::listen::drain::Drain;
use crate::settings::Settings;
use crate::telemetry::logging::LogHandle;
use crate::telemetry::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind the {what} listener on {addr} ({var}): {source}")]
    Bind { what: &'static str, var: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("no {what} listener could be bound ({var})")]
    NoListener { what: &'static str, var: &'static str },
}

/// Binds a listener; IPv6 sockets are v6-only so that `0.0.0.0:p` and `[::]:p` can both be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds each address of a list: an IPv6 address that cannot be bound is logged and skipped, an IPv4 one is fatal.
fn bind_all(addrs: &[SocketAddr], what: &'static str, var: &'static str) -> Result<Vec<TcpListener>, StartError> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        match bind(addr) {
            Ok(l) => listeners.push(l),
            Err(source) if addr.is_ipv6() => {
                tracing::warn!(%addr, error = %source, "IPv6 {what} listener not bound (no IPv6 on this host?); skipped");
            }
            Err(source) => {
                return Err(StartError::Bind { what, var, addr, source });
            }
        }
    }
    if listeners.is_empty() {
        return Err(StartError::NoListener { what, var });
    }
    Ok(listeners)
}

/// Runs the proxy until it has drained after SIGTERM/SIGINT or `POST /shutdown`.
pub async fn run(settings: Settings, log: Option<LogHandle>) -> Result<(), StartError> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(ConfigStore::new());
    let drain = Drain::new();
    let tls = Arc::new(MeshTls::default());
    // With a control plane, startup also waits for a workload identity.
    let needs_identity = settings.control.is_some().then(|| tls.clone());
    let health = Arc::new(Health::new(settings.config_file.is_some() || settings.control.is_some(), needs_identity));

    let outbound = bind_all(&settings.outbound_addrs, "outbound", "FERRY_OUTBOUND_ADDR")?;
    let inbound = bind_all(&settings.inbound_addrs, "inbound", "FERRY_INBOUND_ADDR")?;
    let admin_listener = bind_all(&[settings.admin_addr], "admin", "FERRY_ADMIN_ADDR")?.remove(0);
    let health_listener = bind_all(&[settings.health_addr], "health", "FERRY_HEALTH_ADDR")?.remove(0);

    match &settings.config_file {
        Some(path) => {
            tokio::spawn(file::run_file_source(
                path.clone(),
                settings.config_poll,
                settings.namespace.clone(),
                settings.declared_services(),
                store.clone(),
                metrics.clone(),
            ));
        }
        None if let Some(control) = &settings.control => {
            tokio::spawn(crate::identity::run(control.clone(), tls.clone(), metrics.clone()));
            if settings.on_demand {
                let od = Arc::new(crate::discovery::on_demand::OnDemand::new(
                    settings.subscription_idle,
                    settings.negative_ttl,
                ));
                let _ = store.on_demand.set(od.clone());
                let live = store.clone();
                tokio::spawn(od.run_sweeper(move |name| live.load().service_used(name)));
            }
            tokio::spawn(crate::discovery::xds::run(settings.clone(), store.clone(), metrics.clone(), tls.clone()));
        }
        None => tracing::info!(
            "no config source (FERRY_CONFIG_FILE and FERRY_CONTROL_ADDR unset): explicit requests get 502 no-route"
        ),
    }

    let listeners = Listeners::new(settings.clone(), store.clone(), metrics.clone(), drain.clone(), tls.clone());
    tokio::spawn(listeners.clone().sweep_idle_connections());
    for (bound, direction) in [(outbound, Direction::Outbound), (inbound, Direction::Inbound)] {
        for l in bound {
            tracing::info!(addr = ?l.local_addr().ok(), direction = direction.as_str(), "listening");
            tokio::spawn(listeners.clone().serve(l, direction));
        }
    }
    let state = Arc::new(AdminState {
        settings: settings.clone(),
        store,
        metrics,
        drain: drain.clone(),
        health: health.clone(),
        log,
        connections: listeners.connections.clone(),
        balancers: listeners.registries.balancers.clone(),
    });
    tracing::info!(admin = %settings.admin_addr, health = %settings.health_addr, "admin and health servers listening");
    tokio::spawn(admin::serve(state.clone(), admin_listener, admin::Server::Admin));
    tokio::spawn(admin::serve(state, health_listener, admin::Server::Health));
    health.set_listeners_bound();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
            tracing::info!("SIGTERM received");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = drain.signaled() => {}
    }
    drain.start();
    tracing::info!(
        deadline_seconds = settings.drain.as_secs(),
        in_flight = drain.in_flight(),
        "draining: inbound closed, outbound open until nothing is in flight or the deadline"
    );
    tokio::select! {
        _ = drain.wait_idle() => tracing::info!("drained: nothing in flight; exiting"),
        _ = tokio::time::sleep(settings.drain) => {
            tracing::warn!(in_flight = drain.in_flight(), "drain deadline reached; exiting with connections still open");
        }
    }
    Ok(())
}
