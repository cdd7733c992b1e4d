//! The CSR service (`ferry.v1.Identity/Certify`) and the one place that authenticates a proxy: by join token (first
//! certificate) or by its current workload certificate over mTLS (renewals, xDS streams).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tonic::{Request, Response, Status};

use crate::buckets::Buckets;
use crate::identity::ca::MeshCa;
use crate::identity::serving::PeerInfo;
use crate::identity::tokens::{TokenError, Tokens};
use crate::metrics::ControlMetrics;
use ferry_api::identity::{self, Identity, Lineage, PodRef};
use ferry_api::resources::pb;

/// Certificates are refused above this lifetime (a week): short-lived certificates are the point.
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Who a request proved to be, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub identity: Identity,
    /// The join token presented, or the one the presented certificate's lineage started from.
    pub token_id: Option<String>,
    pub credential: &'static str,
    /// The presented certificate's expiry (Unix seconds), when a certificate was presented.
    pub not_after: Option<i64>,
    /// Kubernetes mode: the pod the ServiceAccount token was bound to, or the presented certificate was issued for.
    pub pod: Option<PodRef>,
}

impl Authenticated {
    /// What a certificate issued on this authentication records of its lineage.
    pub fn lineage(&self) -> Lineage<'_> {
        match (&self.pod, &self.token_id) {
            (Some(pod), _) => Lineage::Pod(pod),
            (None, Some(id)) => Lineage::JoinToken(id),
            (None, None) => Lineage::None,
        }
    }
}

/// Why a request was refused: `reason` is the metric label, `message` what the client and the log see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { reason, message: message.into() }
    }
}

/// Authenticates by the client certificate the TLS handshake verified against the trust bundle. A certificate
/// whose lineage started from a since-revoked join token is refused.
pub fn by_certificate(tokens: &Mutex<Tokens>, chain: &[CertificateDer<'_>]) -> Result<Authenticated, Refusal> {
    let leaf = chain.first().ok_or_else(|| Refusal::new("missing", "no client certificate"))?;
    let info = identity::inspect(leaf).map_err(|e| Refusal::new("certificate", e.to_string()))?;
    // The handshake checked validity when the connection opened; a connection may outlive the certificate.
    let now = identity::unix_now();
    if info.not_after <= now {
        return Err(Refusal::new("expired", "the client certificate has expired"));
    }
    if let Some(id) = &info.token_id
        && tokens.lock().expect("tokens lock").is_revoked(id)
    {
        return Err(Refusal::new("revoked", format!("token {id} was revoked (the certificate descends from it)")));
    }
    Ok(Authenticated {
        identity: info.identity,
        token_id: info.token_id,
        credential: "certificate",
        not_after: Some(info.not_after),
        pod: info.pod,
    })
}

/// Authenticates by a join token sent as `authorization: Bearer <token>`.
pub fn by_token(tokens: &Mutex<Tokens>, authorization: Option<&str>, now: i64) -> Result<Authenticated, Refusal> {
    let Some(token) = authorization.and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(Refusal::new(
            "missing",
            "no credential: send the join token as `authorization: Bearer <token>`, or a workload certificate",
        ));
    };
    match tokens.lock().expect("tokens lock").verify(token, now) {
        Ok(record) => Ok(Authenticated {
            identity: Identity::new(&record.namespace, &record.service_account),
            token_id: Some(record.id.clone()),
            credential: "join-token",
            not_after: None,
            pod: None,
        }),
        Err(e) => {
            let reason = match e {
                TokenError::Malformed => "malformed",
                TokenError::Unknown(_) => "unknown",
                TokenError::Expired(_) => "expired",
                TokenError::Revoked(_) => "revoked",
            };
            Err(Refusal::new(reason, e.to_string()))
        }
    }
}

/// Checks a bearer credential that is not a join token (Kubernetes mode: the pod's ServiceAccount token, by a
/// TokenReview), and that the pod a certificate was issued for still exists (renewals).
#[tonic::async_trait]
pub trait BearerCheck: Send + Sync {
    async fn check(&self, token: &str, peer: Option<std::net::SocketAddr>) -> Result<Authenticated, Refusal>;

    /// Whether the pod `authenticated` names still exists with the same uid and service account (and, when known,
    /// the caller's IP): a deleted pod's certificate is never renewed.
    fn still_bound(&self, authenticated: &Authenticated, peer: Option<std::net::SocketAddr>) -> Result<(), Refusal>;
}

/// Signs workload certificates for authenticated proxies.
pub struct CertifyService {
    pub ca: Arc<MeshCa>,
    pub tokens: Arc<Mutex<Tokens>>,
    /// Set in Kubernetes mode: bearer tokens are ServiceAccount tokens, never join tokens.
    pub bearer: Option<Arc<dyn BearerCheck>>,
    pub metrics: Arc<ControlMetrics>,
    pub lifetime: Duration,
    pub renewals: Renewals,
}

/// Renewals (requests authenticated by a certificate) allowed per lineage, so that minting certificate after
/// certificate does not multiply what one credential may hold (ADS streams are capped per certificate). A pod's proxy
/// renews at half-life: a burst of 5, then one a minute (so too a lineage-less identity). A join token's lineage is
/// shared by every proxy started with it: a burst of 50, then 5 a second.
pub struct Renewals {
    pods: Buckets<String>,
    tokens: Buckets<String>,
}

impl Default for Renewals {
    fn default() -> Self {
        const MAX_LINEAGES: usize = 100_000;
        Renewals { pods: Buckets::new(1.0 / 60.0, 5.0, MAX_LINEAGES), tokens: Buckets::new(5.0, 50.0, MAX_LINEAGES) }
    }
}

impl Renewals {
    fn admit(&self, authenticated: &Authenticated, now: std::time::Instant) -> Result<(), Refusal> {
        let admitted = match authenticated.lineage() {
            Lineage::Pod(pod) => self.pods.take(format!("pod/{}", pod.uid), now),
            Lineage::JoinToken(id) => self.tokens.take(id.to_string(), now),
            Lineage::None => self.pods.take(format!("identity/{}", authenticated.identity.spiffe()), now),
        };
        if !admitted {
            return Err(Refusal::new("rate-limited", "too many renewals in this certificate's lineage; retry later"));
        }
        Ok(())
    }
}

impl CertifyService {
    fn refuse(&self, refusal: Refusal, peer: Option<std::net::SocketAddr>) -> Status {
        tracing::warn!(peer = ?peer, reason = refusal.reason, "certificate request refused: {}", refusal.message);
        self.metrics.certificates_refused.with_label_values(&[refusal.reason]).inc();
        match refusal.reason {
            "bad-request" => Status::invalid_argument(refusal.message),
            "rate-limited" => Status::resource_exhausted(refusal.message),
            _ => Status::unauthenticated(refusal.message),
        }
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for CertifyService {
    async fn certify(&self, request: Request<pb::CertifyRequest>) -> Result<Response<pb::CertifyResponse>, Status> {
        let info = request.extensions().get::<PeerInfo>().cloned();
        let peer = info.as_ref().and_then(|i| i.remote);
        // A presented certificate wins: a renewal must not fall back to a (possibly stale) token.
        let authenticated = match info.and_then(|i| i.certs).filter(|c| !c.is_empty()) {
            // Kubernetes mode: a renewal also proves that the pod it was issued for still exists.
            Some(chain) => by_certificate(&self.tokens, &chain).and_then(|a| match &self.bearer {
                Some(check) => check.still_bound(&a, peer).map(|()| a),
                None => Ok(a),
            }),
            None => {
                let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
                match (&self.bearer, authorization.and_then(|v| v.strip_prefix("Bearer "))) {
                    (Some(check), Some(token)) => check.check(token, peer).await,
                    _ => by_token(&self.tokens, authorization, identity::unix_now()),
                }
            }
        }
        .map_err(|r| self.refuse(r, peer))?;
        if authenticated.credential == "certificate" {
            self.renewals.admit(&authenticated, std::time::Instant::now()).map_err(|r| self.refuse(r, peer))?;
        }
        let csr = identity::pem_blocks(&request.get_ref().csr_pem, "CERTIFICATE REQUEST")
            .ok()
            .and_then(|mut blocks| (blocks.len() == 1).then(|| blocks.remove(0)))
            .ok_or_else(|| {
                self.refuse(Refusal::new("bad-request", "csr_pem: expected one PEM CERTIFICATE REQUEST"), peer)
            })?;
        // Signed in place: an ECDSA P-256 signature and a CSR check take tens of microseconds, less than handing
        // them to the blocking pool, whose extra threads (and their allocator arenas) a burst of thousands of
        // proxies would otherwise grow.
        let issued = self
            .ca
            .signing()
            .certify(&csr, &authenticated.identity, authenticated.lineage(), self.lifetime)
            .map_err(|e| self.refuse(Refusal::new("bad-request", e.to_string()), peer))?;
        self.metrics.certificates_issued.with_label_values(&[authenticated.credential]).inc();
        tracing::info!(identity = %authenticated.identity, peer = ?peer, credential = authenticated.credential, not_after = issued.not_after, "workload certificate issued");
        Ok(Response::new(pb::CertifyResponse {
            chain_pem: issued.chain_pem,
            trust_bundle_pem: self.ca.trust_bundle(),
            not_after: issued.not_after,
        }))
    }
}
