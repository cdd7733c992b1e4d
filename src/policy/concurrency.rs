//! The circuit breaker's hard limits on a destination Service: at most `maxRequests` at once, at most
//! `maxPendingRequests` waiting for one of those slots, at most `maxConnections` open to its endpoints; anything beyond
//! gets 503 `overloaded` at once (an opaque connection is closed), with no upstream attempt. State: `Limits`, per Service, kept across config swaps; metrics: `ferry_upstream_requests_active`
//! and `ferry_upstream_requests_pending` against `ferry_upstream_requests_limit`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::Semaphore;

use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::telemetry::metrics::Metrics;

/// The limits of one Service (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_requests: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_connections: Option<u32>,
}

impl Caps {
    /// The default of each cap left out (as Envoy's): 1024.
    pub const DEFAULT: u32 = 1024;

    /// The caps of a `circuitBreaker` (`None`: defaults for all).
    pub fn from_policy(p: Option<&ferry_api::policy::CircuitBreaker>) -> Caps {
        let or_default = |v: Option<u32>| Some(v.unwrap_or(Caps::DEFAULT));
        Caps {
            max_requests: or_default(p.and_then(|p| p.max_requests)),
            max_pending: or_default(p.and_then(|p| p.max_pending_requests)),
            max_connections: or_default(p.and_then(|p| p.max_connections)),
        }
    }
}

/// One Service's slots and waiters.
struct Slots {
    caps: Caps,
    semaphore: Arc<Semaphore>,
    pending: AtomicUsize,
    connections: Arc<Semaphore>,
}

/// A destination's limit on open connections, as the connection pool sees it.
#[derive(Clone)]
pub struct ConnectionLimit {
    pub service: Arc<str>,
    slots: Arc<Semaphore>,
}

impl ConnectionLimit {
    /// A slot for one more connection, held as long as the connection is open; `overloaded` when there is none.
    pub fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ProxyError> {
        self.slots.clone().try_acquire_owned().map_err(|_| ProxyError::Overloaded { service: self.service.to_string() })
    }
}

/// Per destination Service.
#[derive(Default)]
pub struct Limits {
    map: Mutex<HashMap<Arc<str>, Arc<Slots>>>,
}

impl Limits {
    fn slots(&self, service: &Arc<str>, caps: Caps) -> Arc<Slots> {
        let mut map = self.map.lock().expect("limits lock");
        let fresh = || {
            let permits =
                |cap: Option<u32>| Arc::new(Semaphore::new(cap.map_or(Semaphore::MAX_PERMITS, |n| n as usize)));
            Arc::new(Slots {
                caps,
                semaphore: permits(caps.max_requests),
                pending: AtomicUsize::new(0),
                connections: permits(caps.max_connections),
            })
        };
        let slots = map.entry(service.clone()).or_insert_with(fresh);
        if slots.caps != caps {
            // New limits: requests already running keep their permits on the old semaphore.
            *slots = fresh();
        }
        slots.clone()
    }

    /// The connection limit of `service` under `caps`.
    pub fn connections(&self, service: &Arc<str>, caps: Caps) -> ConnectionLimit {
        ConnectionLimit { service: service.clone(), slots: self.slots(service, caps).connections.clone() }
    }
}

/// Admits requests within the destination's caps.
#[derive(Clone)]
pub struct ConcurrencyLayer {
    limits: Arc<Limits>,
    caps: Option<Caps>,
    service: Arc<str>,
    metrics: Arc<Metrics>,
}

impl ConcurrencyLayer {
    pub fn new(limits: Arc<Limits>, caps: Option<Caps>, service: Arc<str>, metrics: Arc<Metrics>) -> Self {
        ConcurrencyLayer { limits, caps, service, metrics }
    }
}

impl<S> tower::Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;

    fn layer(&self, inner: S) -> Concurrency<S> {
        Concurrency { layer: self.clone(), inner }
    }
}

#[derive(Clone)]
pub struct Concurrency<S> {
    layer: ConcurrencyLayer,
    inner: S,
}

// ===== impl Concurrency =====

impl<S, B> tower::Service<Request<B>> for Concurrency<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = ProxyError>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(caps) = self.layer.caps else { return Box::pin(self.inner.call(req)) };
        let l = self.layer.clone();
        let slots = l.limits.slots(&l.service, caps);
        let labels = [&*l.service];
        if let Some(max) = caps.max_requests {
            l.metrics.upstream_limit.with_label_values(&labels).set(i64::from(max));
        }
        // A free slot, or a place in the queue, or 503 at once.
        let permit = match slots.semaphore.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let max_pending = caps.max_pending.map_or(usize::MAX, |n| n as usize);
                if slots.pending.fetch_add(1, Ordering::SeqCst) >= max_pending {
                    slots.pending.fetch_sub(1, Ordering::SeqCst);
                    let service = l.service.to_string();
                    return Box::pin(std::future::ready(Err(ProxyError::Overloaded { service })));
                }
                None
            }
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let labels = [&*l.service];
            let _permit = match permit {
                Some(p) => p,
                None => {
                    l.metrics.upstream_pending.with_label_values(&labels).inc();
                    let p = slots.semaphore.clone().acquire_owned().await;
                    slots.pending.fetch_sub(1, Ordering::SeqCst);
                    l.metrics.upstream_pending.with_label_values(&labels).dec();
                    p.map_err(|_| ProxyError::Overloaded { service: l.service.to_string() })?
                }
            };
            l.metrics.upstream_active.with_label_values(&labels).inc();
            let result = call.await;
            l.metrics.upstream_active.with_label_values(&labels).dec();
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn two_at_once_one_waiting_the_rest_refused() {
        let limits = Arc::new(Limits::default());
        let metrics = Arc::new(Metrics::new());
        let caps = Caps { max_requests: Some(2), max_pending: Some(1), max_connections: None };
        let layer = ConcurrencyLayer::new(limits, Some(caps), "api.default".into(), metrics.clone());
        let slow = tower::service_fn(|_req: Request<()>| async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            Ok::<_, ProxyError>(Response::new(ProxyBody::empty()))
        });
        let call = || layer.layer(slow).oneshot(Request::new(()));
        let (a, b, c, d, e) = tokio::join!(call(), call(), call(), call(), call());
        let results = [a, b, c, d, e];
        let refused = results.iter().filter(|r| r.as_ref().is_err_and(|e| e.reason() == "overloaded")).count();
        assert_eq!((results.len() - refused, refused), (3, 2), "2 running + 1 queued served, 2 refused");
        assert_eq!(metrics.upstream_active.with_label_values(&["api.default"]).get(), 0);
        assert_eq!(metrics.upstream_pending.with_label_values(&["api.default"]).get(), 0);
    }

    #[test]
    fn connection_slots_are_held_until_released() {
        let limits = Limits::default();
        let caps = Caps { max_requests: None, max_pending: None, max_connections: Some(2) };
        let limit = limits.connections(&"db.default".into(), caps);
        let (a, b) = (limit.admit().unwrap(), limit.admit().unwrap());
        assert_eq!(limit.admit().map(|_| ()).unwrap_err().reason(), "overloaded");
        drop(a);
        let _c = limit.admit().expect("a closed connection frees its slot");
        drop(b);
        // Defaults: 1024 of each.
        let d = Caps::from_policy(None);
        assert_eq!((d.max_requests, d.max_pending, d.max_connections), (Some(1024), Some(1024), Some(1024)));
    }
}
