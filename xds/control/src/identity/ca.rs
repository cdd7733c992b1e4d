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

use ferry_api::identity::{Identity, Lineage, unix_now};
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

    pub(crate) fn load(files: &CaFiles) -> Result<Ca, CaError> {
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
        // A key that does not belong to the certificate would sign leaves nobody can verify.
        let cert_key = ferry_api::identity::pem_certificates(&cert_pem)
            .ok()
            .and_then(|ders| ders.into_iter().next())
            .and_then(|der| {
                x509_parser::certificate::X509Certificate::from_der(&der).ok().map(|(_, c)| c.public_key().raw.to_vec())
            });
        if cert_key.as_deref() != Some(rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()) {
            return Err(CaError::Invalid {
                path: files.key.clone(),
                message: format!("is not the key of {}", files.cert.display()),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: files.cert.clone(),
            message: format!("not a PEM CA certificate: {e}"),
        })?;
        Ok(Ca { cert_pem, issuer })
    }

    pub(crate) fn generate(files: &CaFiles) -> Result<Ca, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry.dev");
        // Each root has its own name (a rotation puts two in the trust bundle): when it was made, and a random tag.
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag).map_err(|e| CaError::BadRequest(format!("no randomness: {e}")))?;
        let made = OffsetDateTime::now_utc().unix_timestamp();
        dn.push(DnType::CommonName, format!("Ferry mesh root CA {made}-{}", ferry_api::hex(&tag)));
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
    /// such as CA:TRUE — is ignored: the leaf is CA:FALSE with one URI SAN, the identity's SPIFFE ID. `lineage`
    /// records what the certificate's lineage started from (a join token, or the pod; see [`Lineage`]).
    pub fn certify(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        lineage: Lineage<'_>,
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
        if let Some(unit) = lineage.unit() {
            dn.push(DnType::OrganizationalUnitName, unit);
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

// ===== root rotation =====

/// A root's place in a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Trusted but not signing yet: waits until every connected proxy trusts it.
    Next,
    /// Signs new certificates.
    Signing,
    /// Trusted until retired, while certificates it signed may still be alive.
    Previous,
}

/// The mesh CA with root rotation: the signing root, a staged next root (in the trust bundle, not signing yet) and the
/// previous root (still trusted until retired). Files in the state directory: `ca.{crt,key}` (signing),
/// `ca-next.{crt,key}`, `ca-previous.crt` and `ca-previous.json` (when it may be retired).
pub struct MeshCa {
    dir: PathBuf,
    /// Operator-supplied roots are rotated by the operator, not here.
    supplied: bool,
    state: std::sync::Mutex<Rotation>,
}

struct Rotation {
    signing: std::sync::Arc<Ca>,
    next: Option<std::sync::Arc<Ca>>,
    /// The previous root's certificate and the Unix time after which no certificate it signed is alive.
    previous: Option<(String, i64)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PreviousRoot {
    retire_after: i64,
}

/// Why a rotation step was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("{0}")]
    Ca(#[from] CaError),
    #[error("{0}")]
    Refused(String),
}

impl MeshCa {
    /// Opens the CA and any rotation in progress.
    pub fn open(state_dir: &Path, supplied: Option<CaFiles>) -> Result<MeshCa, CaError> {
        let is_supplied = supplied.is_some();
        // A promotion interrupted between its two renames (the key moved, the certificate not yet): finish it.
        let (next_crt, next_key) = (state_dir.join("ca-next.crt"), state_dir.join("ca-next.key"));
        if next_crt.exists() && !next_key.exists() && state_dir.join("ca-previous.crt").exists() {
            std::fs::rename(&next_crt, state_dir.join("ca.crt"))
                .map_err(|source| CaError::Io { path: next_crt.clone(), source })?;
        }
        let signing = std::sync::Arc::new(Ca::ensure(state_dir, supplied)?);
        let next_files = CaFiles { cert: state_dir.join("ca-next.crt"), key: state_dir.join("ca-next.key") };
        let next = if next_files.cert.exists() && next_files.key.exists() {
            Some(std::sync::Arc::new(Ca::load(&next_files)?))
        } else {
            None
        };
        let previous = match std::fs::read_to_string(state_dir.join("ca-previous.crt")) {
            Ok(pem) => {
                let path = state_dir.join("ca-previous.json");
                let meta: PreviousRoot = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| CaError::Invalid { path, message: "missing or unreadable".into() })?;
                Some((pem, meta.retire_after))
            }
            Err(_) => None,
        };
        let state = std::sync::Mutex::new(Rotation { signing, next, previous });
        Ok(MeshCa { dir: state_dir.to_path_buf(), supplied: is_supplied, state })
    }

    /// The root that signs now.
    pub fn signing(&self) -> std::sync::Arc<Ca> {
        self.state.lock().expect("ca lock").signing.clone()
    }

    pub fn has_next(&self) -> bool {
        self.state.lock().expect("ca lock").next.is_some()
    }

    /// Every root proxies must trust: previous, signing, next.
    pub fn trust_bundle(&self) -> Vec<String> {
        let s = self.state.lock().expect("ca lock");
        let mut roots: Vec<String> = s.previous.iter().map(|(pem, _)| pem.clone()).collect();
        roots.push(s.signing.cert_pem.clone());
        roots.extend(s.next.iter().map(|n| n.cert_pem.clone()));
        roots
    }

    /// Step 1: a new root joins the trust bundle; it signs once every connected proxy trusts it (`promote`).
    pub fn rotate(&self) -> Result<String, RotationError> {
        let mut s = self.state.lock().expect("ca lock");
        if self.supplied {
            return Err(RotationError::Refused(
                "the root was supplied with --ca-cert/--ca-key: rotate it by restarting with the new one".into(),
            ));
        }
        if s.next.is_some() {
            return Err(RotationError::Refused(
                "a new root is already waiting to sign (see `ferryctl ca status`)".into(),
            ));
        }
        if let Some((_, after)) = &s.previous {
            return Err(RotationError::Refused(format!(
                "the previous root is still trusted: retire it first (`ferryctl ca retire`, possible from {after})"
            )));
        }
        let next = Ca::generate(&CaFiles { cert: self.dir.join("ca-next.crt"), key: self.dir.join("ca-next.key") })?;
        let pem = next.cert_pem.clone();
        s.next = Some(std::sync::Arc::new(next));
        Ok(pem)
    }

    /// Step 2 (automatic): the next root signs; the old one stays trusted until every certificate it signed has
    /// expired (`lifetime` from now).
    pub fn promote(&self, lifetime: std::time::Duration) -> Result<(), RotationError> {
        let mut s = self.state.lock().expect("ca lock");
        let Some(next) = s.next.clone() else { return Ok(()) };
        let retire_after = unix_now() + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2) + 1;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        let previous_json = serde_json::to_vec(&PreviousRoot { retire_after }).expect("serializable");
        crate::store::write_atomic(&self.dir.join("ca-previous.json"), &previous_json)
            .map_err(|e| RotationError::Refused(e.to_string()))?;
        let previous = self.dir.join("ca-previous.crt");
        let _ = std::fs::remove_file(&previous);
        write_new(&previous, s.signing.cert_pem.as_bytes(), 0o644)?;
        // Key first: `open` finishes a promotion interrupted between the two renames.
        for (from, to) in [("ca-next.key", "ca.key"), ("ca-next.crt", "ca.crt")] {
            std::fs::rename(self.dir.join(from), self.dir.join(to)).map_err(io(&self.dir.join(to)))?;
        }
        s.previous = Some((s.signing.cert_pem.clone(), retire_after));
        s.signing = next;
        s.next = None;
        Ok(())
    }

    /// Step 3: the previous root leaves the trust bundle, once no certificate it signed can be alive (or `force`).
    pub fn retire(&self, force: bool) -> Result<(), RotationError> {
        let mut s = self.state.lock().expect("ca lock");
        let Some((_, after)) = &s.previous else {
            return Err(RotationError::Refused("no previous root to retire".into()));
        };
        let now = unix_now();
        if now < *after && !force {
            return Err(RotationError::Refused(format!(
                "certificates signed by the previous root may live {} s more; retire after that (or --force)",
                after - now
            )));
        }
        let _ = std::fs::remove_file(self.dir.join("ca-previous.crt"));
        let _ = std::fs::remove_file(self.dir.join("ca-previous.json"));
        s.previous = None;
        Ok(())
    }

    /// The roots, their roles and expiry, for `ferryctl ca status` and `ferryctl check`.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.state.lock().expect("ca lock");
        let mut roots = Vec::new();
        let mut row = |pem: &str, role: Role| {
            let (subject, not_after) =
                ferry_api::identity::describe_certificate(pem).unwrap_or_else(|| ("unparsable".into(), 0));
            roots.push(serde_json::json!({ "role": role, "subject": subject, "notAfter": not_after }));
        };
        if let Some((pem, _)) = &s.previous {
            row(pem, Role::Previous);
        }
        row(&s.signing.cert_pem, Role::Signing);
        if let Some(next) = &s.next {
            row(&next.cert_pem, Role::Next);
        }
        serde_json::json!({
            "roots": roots,
            "previousRetireAfter": s.previous.as_ref().map(|(_, after)| after),
        })
    }
}
