//! The mesh CA root: generated at first start (ECDSA P-256, key 0600) or supplied by the operator; it signs the
//! control plane's serving certificate for the xDS port and every workload certificate, built from the authenticated
//! identity and only the public key of the proxy's CSR.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::identity::{Identity, TOKEN_UNIT_PREFIX};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("--ca-cert and --ca-key go together")]
    Half,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("bad certificate request: {0}")]
    BadRequest(String),
}

/// A workload certificate as issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first.
    pub chain_pem: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// The root (or operator-supplied intermediate) that signs everything the mesh trusts.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// Where the root lives: the state directory, unless the operator brings their own.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// Loads the operator's root (`supplied`), or the one in `state_dir`, or generates one there at first start.
    pub fn ensure(state_dir: &Path, supplied: Option<CaFiles>) -> Result<Ca, CaError> {
        let files = supplied.unwrap_or(CaFiles { cert: state_dir.join("ca.crt"), key: state_dir.join("ca.key") });
        match (files.cert.exists(), files.key.exists()) {
            (true, true) => Self::load(&files),
            (false, false) => Self::generate(&files),
            _ => Err(CaError::Invalid {
                path: if files.cert.exists() { files.key } else { files.cert },
                message: "missing, while its certificate/key counterpart exists".into(),
            }),
        }
    }

    fn load(files: &CaFiles) -> Result<Ca, CaError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| CaError::Io { path: p.into(), source });
        let mode = std::fs::metadata(&files.key)
            .map_err(|source| CaError::Io { path: files.key.clone(), source })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::Invalid {
                path: files.key.clone(),
                message: format!("mode {:o}: the CA key must be 0600", mode & 0o777),
            });
        }
        let key = KeyPair::from_pem(&read(&files.key)?).map_err(|e| CaError::Invalid {
            path: files.key.clone(),
            message: format!("not a PEM private key: {e}"),
        })?;
        let cert_pem = read(&files.cert)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: files.cert.clone(),
            message: format!("not a PEM CA certificate: {e}"),
        })?;
        Ok(Ca { cert_pem, issuer })
    }

    fn generate(files: &CaFiles) -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry.dev");
        dn.push(DnType::CommonName, "Ferry mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&files.cert, cert.pem().as_bytes(), 0o644)?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// A serving certificate (CA:FALSE, server auth) for `dns_names` and `ips`, valid one year, with a fresh key.
    /// Returns (certificate PEM, key PEM).
    pub fn serving_certificate(&self, dns_names: &[&str], ips: &[IpAddr]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns_names.first().copied().unwrap_or("ferry-control"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| n.to_string().try_into().map(SanType::DnsName))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The roots proxies trust for peer certificates.
    pub fn trust_bundle(&self) -> Vec<String> {
        vec![self.cert_pem.clone()]
    }

    /// Issues a workload certificate for `identity` valid for `lifetime`, to the key of `csr_der` (PKCS#10, its
    /// signature checked: the requester holds the key). Everything else in the request — subject, SANs, extensions
    /// such as CA:TRUE — is ignored: the leaf is CA:FALSE with one URI SAN, the identity's SPIFFE ID. `token_id`
    /// records the join token the certificate's lineage started from (see [`TOKEN_UNIT_PREFIX`]).
    pub fn certify(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        token_id: Option<&str>,
        lifetime: std::time::Duration,
    ) -> Result<Issued, CaError> {
        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CaError::BadRequest(format!("not PKCS#10: {e}")))?;
        if !rest.is_empty() {
            return Err(CaError::BadRequest("trailing bytes after the request".into()));
        }
        csr.verify_signature()
            .map_err(|e| CaError::BadRequest(format!("the request's signature does not verify: {e}")))?;
        let public_key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| CaError::BadRequest(format!("unsupported public key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry.dev");
        if let Some(id) = token_id {
            dn.push(DnType::OrganizationalUnitName, format!("{TOKEN_UNIT_PREFIX}{id}"));
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = vec![SanType::URI(identity.spiffe().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| CaError::BadRequest(format!("no randomness: {e}")))?;
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        // A little slack for clocks behind ours.
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::try_from(lifetime).unwrap_or(Duration::days(1));
        let cert = params.signed_by(&public_key, &self.issuer)?;
        Ok(Issued { chain_pem: vec![cert.pem()], not_after: params.not_after.unix_timestamp() })
    }

    /// Writes the serving certificate and key for the xDS port into `dir` (key 0600), replacing earlier ones, and
    /// returns them (certificate PEM, key PEM) for the server to use.
    pub fn write_serving_certificate(
        &self,
        dir: &Path,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<(String, String), CaError> {
        let (cert, key) = self.serving_certificate(dns_names, ips)?;
        for (name, data, mode) in [("server.key", &key, 0o600), ("server.crt", &cert, 0o644)] {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            write_new(&path, data.as_bytes(), mode)?;
        }
        Ok((cert, key))
    }
}

/// Creates `path` with `mode` from the start (a key is never readable by others, not even briefly).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io { path: path.into(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}
