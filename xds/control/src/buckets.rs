//! Token buckets by key (a source address, a certificate lineage), keeping at most a bounded number of keys: the
//! control plane's per-client limits.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// One bucket per key: `burst` tokens, refilled at `per_second`.
pub struct Buckets<K> {
    per_second: f64,
    burst: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq> Buckets<K> {
    pub fn new(per_second: f64, burst: f64, max_keys: usize) -> Self {
        Buckets { per_second, burst, max_keys, buckets: Mutex::default() }
    }

    /// Whether `key` has a whole token now (nothing is taken).
    pub fn has(&self, key: &K, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("buckets lock");
        match buckets.get_mut(key) {
            Some(bucket) => self.refill(bucket, now) >= 1.0,
            None => true,
        }
    }

    /// Takes a token from `key`'s bucket; with none left, takes nothing and says so.
    pub fn take(&self, key: K, now: Instant) -> bool {
        self.with(key, now, |tokens| {
            let taken = *tokens >= 1.0;
            if taken {
                *tokens -= 1.0;
            }
            taken
        })
    }

    /// Spends a token of `key`'s whether or not one is left (for what already happened: a refused review).
    pub fn spend(&self, key: K, now: Instant) {
        self.with(key, now, |tokens| *tokens = (*tokens - 1.0).max(0.0));
    }

    /// `f` on `key`'s refilled tokens (a new key starts full). At `max_keys`, full buckets are forgotten first: they
    /// say nothing a new one would not.
    fn with<T>(&self, key: K, now: Instant, f: impl FnOnce(&mut f64) -> T) -> T {
        let mut buckets = self.buckets.lock().expect("buckets lock");
        if buckets.len() >= self.max_keys && !buckets.contains_key(&key) {
            buckets.retain(|_, bucket| self.refill(bucket, now) < self.burst);
        }
        let bucket = buckets.entry(key).or_insert((self.burst, now));
        self.refill(bucket, now);
        f(&mut bucket.0)
    }

    /// Brings a bucket's tokens up to `now`, and returns them.
    fn refill(&self, (tokens, at): &mut (f64, Instant), now: Instant) -> f64 {
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        *tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_key_and_a_bounded_number_of_keys() {
        let buckets = Buckets::new(2.0, 3.0, 2);
        let t0 = Instant::now();
        assert_eq!((0..5).map(|_| buckets.take("a", t0)).filter(|t| *t).count(), 3, "the burst");
        assert!(!buckets.has(&"a", t0));
        assert!(buckets.has(&"b", t0), "another key is not affected");
        assert!(buckets.has(&"a", t0 + Duration::from_millis(500)), "one token back after half a second at 2/s");
        // `spend` takes what is not there: the key stays empty.
        buckets.spend("b", t0);
        buckets.spend("b", t0);
        buckets.spend("b", t0);
        buckets.spend("b", t0);
        assert!(!buckets.has(&"b", t0));
        // At two keys, a third forgets the full ones only: "a" and "b" are not full, so both stay.
        buckets.take("c", t0);
        assert!(!buckets.has(&"b", t0), "a bucket that is not full is kept");
    }
}
