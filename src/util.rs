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
    let hex = ferry_api::hex(&b);
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Fills `buf` from the system's secure random source (through rustls' crypto provider).
pub fn random_bytes(buf: &mut [u8]) {
    static RANDOM: std::sync::OnceLock<&'static dyn rustls::crypto::SecureRandom> = std::sync::OnceLock::new();
    let random = RANDOM.get_or_init(|| rustls::crypto::aws_lc_rs::default_provider().secure_random);
    random.fill(buf).expect("the system random source works");
}
