//! Certificate signing requests (PKCS#10 DER from anyone who reaches :15010): never panics; what is signed is the
//! requester's key with the identity Ferry chose, never the request's own names or CA flag.
#![no_main]

use std::sync::LazyLock;

use ferry_api::identity::{Identity, Lineage};
use ferry_control::identity::ca::Ca;
use libfuzzer_sys::fuzz_target;

static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    Ca::ensure(&dir, None).expect("a CA")
});

fuzz_target!(|data: &[u8]| {
    let identity = Identity::new("shop", "web");
    if let Ok(issued) = CA.certify(data, &identity, Lineage::None, std::time::Duration::from_secs(3600)) {
        let pem = &issued.chain_pem[0];
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }
});
