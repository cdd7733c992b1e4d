//! The circuit breaker's hard limits on a destination Service: at most `maxRequests` at once, at most
//! `maxPendingRequests` waiting for one of those slots, at most `maxConnections` open to its endpoints; anything beyond
//! gets 503 `overloaded` at once (an opaque connection is closed), with no upstream attempt. State: `Limits`, per Service, kept across config swaps; metrics: `ferry_upstream_requests_active`
//! and `ferry_upstream_requests_pending` against `ferry_upstream_requests_limit`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use http::{Request, Response};
use prometheus::IntGauge;
use tokio::sync::Semaphore;

use super::{Mechanism, refuse};
use crate::body::ProxyBody;
use crate::errors::{ProxyError, ResponseFuture};
use crate::telemetry::metrics::Metrics;
use crate::util::FastMap;

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
    /// Its active and pending gauges, looked up by label once (its limit gauge is set then): not per request.
    gauges: OnceLock<(IntGauge, IntGauge)>,
}

impl Slots {
    fn gauges(&self, service: &str, metrics: &Metrics) -> &(IntGauge, IntGauge) {
        self.gauges.get_or_init(|| {
            let labels = [service];
            if let Some(max) = self.caps.max_requests {
                metrics.upstream_limit.with_label_values(&labels).set(i64::from(max));
            }
            (metrics.upstream_active.with_label_values(&labels), metrics.upstream_pending.with_label_values(&labels))
        })
    }
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
    map: Mutex<FastMap<Arc<str>, Arc<Slots>>>,
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
                gauges: OnceLock::new(),
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

/// Admits requests within the destination's caps (`Config`: its caps and the Service they are kept for).
pub struct Concurrency {
    limits: Arc<Limits>,
    metrics: Arc<Metrics>,
}

impl Concurrency {
    pub fn new(limits: Arc<Limits>, metrics: Arc<Metrics>) -> Self {
        Concurrency { limits, metrics }
    }
}

impl Mechanism for Concurrency {
    type Config = (Caps, Arc<str>);

    fn call<S>(&self, (caps, service): Self::Config, inner: &mut S, req: Request<ProxyBody>) -> ResponseFuture
    where
        S: tower::Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = ProxyError>,
        S::Future: Send + 'static,
    {
        let slots = self.limits.slots(&service, caps);
        slots.gauges(&service, &self.metrics);
        // A free slot, or a place in the queue, or 503 at once.
        let permit = match slots.semaphore.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let max_pending = caps.max_pending.map_or(usize::MAX, |n| n as usize);
                if slots.pending.fetch_add(1, Ordering::SeqCst) >= max_pending {
                    slots.pending.fetch_sub(1, Ordering::SeqCst);
                    return refuse(ProxyError::Overloaded { service: service.to_string() });
                }
                None
            }
        };
        let call = inner.call(req);
        Box::pin(async move {
            let (active, pending) = slots.gauges.get().expect("gauges looked up before the call");
            let _permit = match permit {
                Some(p) => p,
                None => {
                    pending.inc();
                    let p = slots.semaphore.clone().acquire_owned().await;
                    slots.pending.fetch_sub(1, Ordering::SeqCst);
                    pending.dec();
                    p.map_err(|_| ProxyError::Overloaded { service: service.to_string() })?
                }
            };
            active.inc();
            let result = call.await;
            active.dec();
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
        let caps = |_: &Request<ProxyBody>| {
            Some((Caps { max_requests: Some(2), max_pending: Some(1), max_connections: None }, "api.default".into()))
        };
        let layer = crate::policy::Layer::new(Concurrency::new(limits, metrics.clone()), caps);
        let slow = tower::service_fn(|_req: Request<ProxyBody>| async {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            Ok::<_, ProxyError>(Response::new(ProxyBody::empty()))
        });
        let call = || layer.layer(slow).oneshot(Request::new(ProxyBody::empty()));
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
