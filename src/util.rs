//! Small helpers every part may use: random numbers for jitter and sampling, request IDs.

/// A number in [0, 1) for jitter, from the std hasher's per-process random keys (no extra dependency for jitter).
pub fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniformly distributed `u64` (SipHash of the time under the std hasher's random keys): jitter, sampling and
/// traffic splits, not secrets.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

/// A random version-4 UUID, from the TLS library's system random source (`x-request-id`).
pub fn request_id() -> String {
    let mut b = [0u8; 16];
    random_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // 8-4-4-4-12 hex digits.
    let mut id = String::with_capacity(36);
    for (i, part) in [&b[0..4], &b[4..6], &b[6..8], &b[8..10], &b[10..16]].into_iter().enumerate() {
        if i > 0 {
            id.push('-');
        }
        ferry_api::push_hex(&mut id, part);
    }
    id
}

/// Fills `buf` from the system's secure random source (through rustls' crypto provider).
pub fn random_bytes(buf: &mut [u8]) {
    static RANDOM: std::sync::OnceLock<&'static dyn rustls::crypto::SecureRandom> = std::sync::OnceLock::new();
    let random = RANDOM.get_or_init(|| rustls::crypto::aws_lc_rs::default_provider().secure_random);
    random.fill(buf).expect("the system random source works");
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_version_4_uuids() {
        for _ in 0..100 {
            let id = super::request_id();
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
