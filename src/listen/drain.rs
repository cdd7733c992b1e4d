//! Graceful shutdown: a drain signal every connection watches, and a count of what is still in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Cheap to clone; all clones share one signal and one in-flight count.
#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    signal: watch::Sender<bool>,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Held while a connection is open; dropping it may wake `wait_idle`.
pub struct InFlight {
    inner: Arc<Inner>,
}

impl Drain {
    pub fn new() -> Self {
        Drain {
            inner: Arc::new(Inner {
                signal: watch::channel(false).0,
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.inner.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.signal.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.inner.signal.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn track(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { inner: self.inner.clone() }
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when nothing is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn waits_for_in_flight_work() {
        let drain = Drain::new();
        let a = drain.track();
        let b = drain.track();
        assert!(!drain.is_draining());
        drain.start();
        drain.signaled().await;
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait_idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.unwrap().unwrap();
    }
}
