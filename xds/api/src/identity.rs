//! Workload identities (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) and what a mesh certificate says about its holder.

use std::fmt;

use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::TRUST_DOMAIN;

/// The subject's organizational unit of a workload certificate names the join token its lineage started from
/// (`join-token <id>`), so that revoking the token also ends renewals and xDS streams of its certificates. The token
/// id is public (`ferryctl token list`); the secret never appears.
pub const TOKEN_UNIT_PREFIX: &str = "join-token ";
/// In Kubernetes mode the organizational unit names the pod the certificate's lineage was issued for
/// (`pod <name> <uid>`; the namespace is the identity's): any replica, and a restarted control plane, can check that
/// the pod still exists before renewing, and bind an xDS stream to it.
pub const POD_UNIT_PREFIX: &str = "pod ";

/// The pod a Kubernetes-mode certificate was issued for (in its identity's namespace).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub name: String,
    pub uid: String,
}

/// What a certificate's lineage started from, recorded in the certificate itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lineage<'a> {
    None,
    JoinToken(&'a str),
    Pod(&'a PodRef),
}

impl Lineage<'_> {
    /// The organizational unit that records it.
    pub fn unit(&self) -> Option<String> {
        match self {
            Lineage::None => None,
            Lineage::JoinToken(id) => Some(format!("{TOKEN_UNIT_PREFIX}{id}")),
            Lineage::Pod(pod) => Some(format!("{POD_UNIT_PREFIX}{} {}", pod.name, pod.uid)),
        }
    }
}

/// Seconds since the Unix epoch, the unit of certificate validity here.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Who a workload is: a service account in a namespace of the mesh's trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(namespace: &str, service_account: &str) -> Identity {
        Identity { namespace: namespace.to_string(), service_account: service_account.to_string() }
    }

    /// The SPIFFE ID, as the certificate's URI SAN carries it.
    pub fn spiffe(&self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// Parses `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of this mesh's trust domain.
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let bad = || IdentityError::NotSpiffe(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (domain, path) = rest.split_once('/').ok_or_else(bad)?;
        if domain != TRUST_DOMAIN {
            return Err(IdentityError::ForeignDomain(uri.to_string()));
        }
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", ns, "sa", sa] if !ns.is_empty() && !sa.is_empty() => Ok(Identity::new(ns, sa)),
            _ => Err(bad()),
        }
    }

    /// The identity a Service's `identities` entry names: a service account of the Service's namespace, or a full
    /// SPIFFE ID.
    pub fn of_service_entry(entry: &str, service_namespace: &str) -> Result<Identity, IdentityError> {
        if entry.starts_with("spiffe://") {
            Identity::parse(entry)
        } else {
            Ok(Identity::new(service_namespace, entry))
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<account>")]
    NotSpiffe(String),
    #[error("`{0}` is not in this mesh's trust domain ({TRUST_DOMAIN})")]
    ForeignDomain(String),
    #[error("not a parsable X.509 certificate: {0}")]
    Certificate(String),
    #[error("the certificate carries {0} SPIFFE URI SANs; a workload certificate has exactly one")]
    UriSans(usize),
}

/// What the proxy and the control plane read from a workload certificate (the chain was verified by TLS first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Hex, as `openssl x509 -serial` prints it (upper case).
    pub serial: String,
    /// The join token the certificate's lineage started from, if the CA recorded one.
    pub token_id: Option<String>,
    /// Kubernetes mode: the pod it was issued for.
    pub pod: Option<PodRef>,
}

/// Reads a DER workload certificate: exactly one `spiffe://` URI SAN, in this trust domain.
pub fn inspect(cert_der: &[u8]) -> Result<CertInfo, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                uris.push(*uri);
            }
        }
    }
    let [uri] = uris.as_slice() else { return Err(IdentityError::UriSans(uris.len())) };
    let units: Vec<&str> = cert.subject().iter_organizational_unit().filter_map(|ou| ou.as_str().ok()).collect();
    let token_id = units.iter().find_map(|ou| ou.strip_prefix(TOKEN_UNIT_PREFIX).map(str::to_string));
    let pod = units.iter().find_map(|ou| {
        let (name, uid) = ou.strip_prefix(POD_UNIT_PREFIX)?.split_once(' ')?;
        Some(PodRef { name: name.to_string(), uid: uid.to_string() })
    });
    Ok(CertInfo {
        identity: Identity::parse(uri)?,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string().replace(':', "").to_uppercase(),
        token_id,
        pod,
    })
}

/// The expiry (Unix seconds) of the first certificate of a PEM bundle; `None` when there is none.
pub fn root_expiry(pem: &str) -> Option<i64> {
    describe_certificate(pem).map(|(_, not_after)| not_after)
}

/// Subject and expiry (Unix seconds) of the first certificate of a PEM bundle; `None` when none parses.
pub fn describe_certificate(pem: &str) -> Option<(String, i64)> {
    let der = pem_certificates(pem).ok()?.into_iter().next()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some((cert.subject().to_string(), cert.validity().not_after.timestamp()))
}

/// The DER bytes of every certificate in a PEM text, in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    pem_blocks(pem, "CERTIFICATE")
}

/// The DER bytes of every PEM block labelled `label`, in order.
pub fn pem_blocks(pem: &str, label: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let mut out = Vec::new();
    for item in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let item = item.map_err(|e| IdentityError::Certificate(e.to_string()))?;
        if item.label == label {
            out.push(item.contents);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let cases: Vec<(&str, Result<Identity, ()>)> = vec![
            ("spiffe://cluster.local/ns/shop/sa/payments", Ok(Identity::new("shop", "payments"))),
            ("spiffe://other.org/ns/shop/sa/payments", Err(())),
            ("spiffe://cluster.local/ns/shop/sa/", Err(())),
            ("spiffe://cluster.local/ns/shop/sa/x/y", Err(())),
            ("https://cluster.local/ns/shop/sa/payments", Err(())),
            ("payments", Err(())),
        ];
        for (uri, want) in cases {
            assert_eq!(Identity::parse(uri).map_err(|_| ()), want, "{uri}");
        }
        assert_eq!(Identity::new("a", "b").spiffe(), "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(Identity::of_service_entry("web", "shop").unwrap(), Identity::new("shop", "web"));
        assert_eq!(
            Identity::of_service_entry("spiffe://cluster.local/ns/ops/sa/probe", "shop").unwrap(),
            Identity::new("ops", "probe")
        );
    }
}
