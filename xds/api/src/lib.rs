//! What the proxy, the control plane and the CLI share: the `ferry.dev/v1alpha1` documents and their validation, the
//! `ferry.v1` protos, identities and certificates, the HTTP API's limits; with `kubernetes`, the pure Kubernetes
//! transformations (CRDs, injection, discovery's object → model mapping).
#![forbid(unsafe_code)]

pub mod cidr;
pub mod config;
pub mod duration;
pub mod grpc_route;
pub mod http_api;
pub mod identity;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod meta;
pub mod policy;
pub mod protocol;
pub mod resources;
pub mod route;
pub mod workload;

pub use config::{
    API_VERSION, ConfigError, Document, Endpoint, FieldError, KINDS, Metadata, PortProtocol, Service, ServicePort,
    ServiceSpec, canonical_kind, document_json, is_dns_label, one_traffic_policy_error, parse_documents, parse_value,
    port_number, split_host_port,
};
pub use duration::{DurationError, parse_duration};

/// Lower-case hex of `bytes`, as digests, versions and trace IDs are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().flat_map(|b| hex_pair(*b)).map(char::from).collect()
}

/// Writes the lower-case hex of `bytes` into `out`, two digits a byte (`out` is at least twice as long).
pub fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&hex_pair(*b));
    }
}

/// The two lower-case hex digits of `b`.
fn hex_pair(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0x0f)]]
}

/// The SPIFFE trust domain of local mode: identities are `spiffe://cluster.local/ns/<namespace>/sa/<account>`.
pub const TRUST_DOMAIN: &str = "cluster.local";

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(super::hex(&[]), "");
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let all: Vec<u8> = (0..=255).collect();
        let reference: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(super::hex(&all), reference);
    }
}
