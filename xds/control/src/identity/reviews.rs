//! What stands between the xDS port and the API server's TokenReviews: an accepted token's result is reused (by its
//! digest, for at most its validity, its pod binding checked again each time); refused reviews are rate-limited per
//! source address; at most a few reviews run at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::buckets::Buckets;
use crate::identity::certify::{Authenticated, BearerCheck, Refusal};

/// How many results and source addresses are kept at most (beyond that, none is added until some expire).
const MAX_ENTRIES: usize = 10_000;
/// An accepted review is reused for at most this long (and never past the token's own `exp`).
const CACHE_FOR: Duration = Duration::from_secs(300);
/// How long a request waits for a review slot before it is refused as `busy`.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// The limits (`ferry-control` flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Refused reviews per second per source address, and the burst.
    pub refusals_per_second: f64,
    pub refusal_burst: f64,
    /// Reviews in flight at once.
    pub in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { refusals_per_second: 1.0, refusal_burst: 10.0, in_flight: 16 }
    }
}

/// A `BearerCheck` (the TokenReview) behind a cache, a per-source refusal limit and a cap on reviews in flight.
pub struct Guarded {
    inner: Arc<dyn BearerCheck>,
    accepted: Mutex<HashMap<[u8; 32], (Authenticated, Instant)>>,
    /// Per source address: a token spent by each refused review.
    refusals: Buckets<IpAddr>,
    slots: Semaphore,
    counted: prometheus::IntCounterVec,
}

impl Guarded {
    pub fn new(inner: Arc<dyn BearerCheck>, limits: Limits, counted: prometheus::IntCounterVec) -> Guarded {
        Guarded {
            inner,
            accepted: Mutex::default(),
            refusals: Buckets::new(limits.refusals_per_second, limits.refusal_burst, MAX_ENTRIES),
            slots: Semaphore::new(limits.in_flight.max(1)),
            counted,
        }
    }

    fn count(&self, result: &str) {
        self.counted.with_label_values(&[result]).inc();
    }

    fn remember(&self, digest: [u8; 32], authenticated: &Authenticated, token: &str, now: Instant) {
        let ttl = match token_expires_in(token) {
            Some(left) => left.min(CACHE_FOR),
            None => return,
        };
        let mut accepted = self.accepted.lock().expect("reviews lock");
        if accepted.len() >= MAX_ENTRIES {
            accepted.retain(|_, (_, until)| *until > now);
            if accepted.len() >= MAX_ENTRIES {
                return;
            }
        }
        accepted.insert(digest, (authenticated.clone(), now + ttl));
    }
}

/// How long until a JWT's `exp` (read, not verified: the TokenReview verified it), if it has one in the future.
fn token_expires_in(token: &str) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("exp")?.as_i64()?;
    let left = exp - ferry_api::identity::unix_now();
    (left > 0).then(|| Duration::from_secs(left as u64))
}

#[tonic::async_trait]
impl BearerCheck for Guarded {
    async fn check(&self, token: &str, peer: Option<SocketAddr>) -> Result<Authenticated, Refusal> {
        let now = Instant::now();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached =
            self.accepted.lock().expect("reviews lock").get(&digest).filter(|(_, until)| *until > now).cloned();
        if let Some((authenticated, _)) = cached {
            // The pod binding is checked again: the pod may be gone, or the caller elsewhere.
            self.inner.still_bound(&authenticated, peer)?;
            self.count("cached");
            return Ok(authenticated);
        }
        let source = peer.map(|p| p.ip());
        if source.is_some_and(|ip| !self.refusals.has(&ip, now)) {
            self.count("rate-limited");
            return Err(Refusal {
                reason: "rate-limited",
                message: "too many refused tokens from this address; retry later".into(),
            });
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, self.slots.acquire()).await else {
            self.count("busy");
            return Err(Refusal { reason: "unavailable", message: "too many token reviews in flight".into() });
        };
        match self.inner.check(token, peer).await {
            Ok(authenticated) => {
                self.count("accepted");
                self.remember(digest, &authenticated, token, Instant::now());
                Ok(authenticated)
            }
            // The API server's trouble is not the caller's fault.
            Err(refusal) if refusal.reason == "unavailable" => {
                self.count("unavailable");
                Err(refusal)
            }
            Err(refusal) => {
                self.count("refused");
                if let Some(ip) = source {
                    self.refusals.spend(ip, Instant::now());
                }
                Err(refusal)
            }
        }
    }

    fn still_bound(&self, authenticated: &Authenticated, peer: Option<SocketAddr>) -> Result<(), Refusal> {
        self.inner.still_bound(authenticated, peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::identity::Identity;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Accepts tokens starting with `good`, counting the reviews it is asked for.
    struct Counting(AtomicUsize);

    #[tonic::async_trait]
    impl BearerCheck for Counting {
        async fn check(&self, token: &str, _: Option<SocketAddr>) -> Result<Authenticated, Refusal> {
            self.0.fetch_add(1, Ordering::SeqCst);
            match token.starts_with("good") {
                true => Ok(Authenticated {
                    identity: Identity::new("ns", "sa"),
                    token_id: None,
                    credential: "service-account-token",
                    not_after: None,
                    pod: None,
                }),
                false => Err(Refusal { reason: "unauthenticated", message: "no".into() }),
            }
        }

        fn still_bound(&self, _: &Authenticated, _: Option<SocketAddr>) -> Result<(), Refusal> {
            Ok(())
        }
    }

    /// An API server that takes 10 s per review, recording how many it had in flight at most.
    #[derive(Default)]
    struct Slow {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    #[tonic::async_trait]
    impl BearerCheck for Slow {
        async fn check(&self, _: &str, _: Option<SocketAddr>) -> Result<Authenticated, Refusal> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(10)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Err(Refusal { reason: "unauthenticated", message: "no".into() })
        }

        fn still_bound(&self, _: &Authenticated, _: Option<SocketAddr>) -> Result<(), Refusal> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_api_server_has_at_most_the_limit_of_reviews_in_flight() {
        let inner = Arc::new(Slow::default());
        let counted = prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["result"]).unwrap();
        let limits = Limits { refusals_per_second: 1000.0, refusal_burst: 1000.0, in_flight: 2 };
        let guarded = Guarded::new(inner.clone(), limits, counted.clone());
        // Ten callers from ten addresses at once: two reviews go out, the others give up after SLOT_WAIT.
        let calls = (0..10).map(|i| {
            let peer = Some(SocketAddr::from(([10, 0, 0, i], 1)));
            let guarded = &guarded;
            async move { guarded.check(&format!("junk-{i}"), peer).await.unwrap_err() }
        });
        let refusals = futures_util::future::join_all(calls).await;
        assert_eq!(inner.most.load(Ordering::SeqCst), 2);
        let busy = refusals.iter().filter(|r| r.message == "too many token reviews in flight").count();
        assert_eq!((busy, counted.with_label_values(&["busy"]).get()), (8, 8));
        assert_eq!(counted.with_label_values(&["refused"]).get(), 2);
    }

    fn jwt(exp_in: i64) -> String {
        use base64::Engine;
        let claims = serde_json::json!({"exp": ferry_api::identity::unix_now() + exp_in}).to_string();
        format!("good.{}.sig", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims))
    }

    #[tokio::test]
    async fn accepted_tokens_are_reused_and_refusals_are_limited_per_source() {
        let inner = Arc::new(Counting(AtomicUsize::new(0)));
        let counted = prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["result"]).unwrap();
        let limits = Limits { refusals_per_second: 0.001, refusal_burst: 3.0, in_flight: 2 };
        let guarded = Guarded::new(inner.clone(), limits, counted.clone());
        let (attacker, other) = (Some("10.0.0.1:1".parse().unwrap()), Some("10.0.0.2:1".parse().unwrap()));
        // 100 junk tokens from one address: 3 reviews (the burst), the rest refused without one.
        for i in 0..100 {
            let refusal = guarded.check(&format!("junk-{i}"), attacker).await.unwrap_err();
            assert_eq!(refusal.reason, if i < 3 { "unauthenticated" } else { "rate-limited" }, "{i}");
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 3);
        // Another address is not affected; its good token is reviewed once, then reused while valid.
        let token = jwt(3600);
        for _ in 0..5 {
            guarded.check(&token, other).await.unwrap();
        }
        assert_eq!(inner.0.load(Ordering::SeqCst), 4);
        assert_eq!(counted.with_label_values(&["cached"]).get(), 4);
        // A token without a readable `exp`, or an expired one, is never reused.
        for token in ["good-opaque", &jwt(-10)] {
            let before = inner.0.load(Ordering::SeqCst);
            guarded.check(token, other).await.unwrap();
            guarded.check(token, other).await.unwrap();
            assert_eq!(inner.0.load(Ordering::SeqCst), before + 2, "{token}");
        }
    }
}
