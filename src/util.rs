//! Small helpers every part may use: random numbers for jitter, sampling, splits and IDs; request IDs.

use rand::{Rng, RngCore};

// Every random number comes from the thread's `rand::rngs::ThreadRng`: ChaCha12 seeded from the operating system and
// reseeded as it goes, so request and trace IDs are unpredictable, at a few instructions a byte (the TLS library's
// system source cost about 2,400 instructions a call, twice per request: benches/README.md, "Data-path cuts").

/// A number in [0, 1): jitter, sampling.
pub fn random_fraction() -> f64 {
    rand::rng().random()
}

/// A uniformly distributed `u64`: traffic splits, sampling.
pub fn random_u64() -> u64 {
    rand::rng().random()
}

/// Fills `buf` with random bytes (trace and span IDs).
pub fn random_bytes(buf: &mut [u8]) {
    rand::rng().fill_bytes(buf);
}

/// A `HashMap` with foldhash's hasher (seeded per map), for the maps every request looks into (the route, balancer,
/// limit, budget, pool and metrics tables): SipHash, std's default, cost about 3,300 instructions a proxied request.
/// Their keys come from the config and the proxy's own connections, not from what a client sends.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A random version-4 UUID (`x-request-id`), as a sensitive header value: between proxies HPACK sends it as a literal
/// that is never indexed (each request's value is new: indexing it would only evict the fields that do repeat).
pub fn request_id() -> http::HeaderValue {
    let mut b = [0u8; 16];
    random_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // 8-4-4-4-12 hex digits.
    let mut id = [b'-'; 36];
    for (digits, bytes) in [(0..8, 0..4), (9..13, 4..6), (14..18, 6..8), (19..23, 8..10), (24..36, 10..16)] {
        ferry_api::write_hex(&mut id[digits], &b[bytes]);
    }
    let mut id = http::HeaderValue::from_bytes(&id).expect("hex digits and dashes are a valid header value");
    id.set_sensitive(true);
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_version_4_uuids() {
        for _ in 0..100 {
            let id = super::request_id();
            assert!(id.is_sensitive());
            let id = id.to_str().unwrap();
            let chars: Vec<char> = id.chars().collect();
            assert_eq!(chars.len(), 36, "{id}");
            for (i, c) in chars.iter().enumerate() {
                match i {
                    8 | 13 | 18 | 23 => assert_eq!(*c, '-', "{id}"),
                    14 => assert_eq!(*c, '4', "version 4: {id}"),
                    19 => assert!("89ab".contains(*c), "RFC 4122 variant: {id}"),
                    _ => assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id}"),
                }
            }
        }
    }
}
