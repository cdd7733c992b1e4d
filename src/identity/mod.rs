//! This proxy's workload identity: a key generated in memory (never written, never sent), a certificate from the
//! control plane's CSR service (join token for the first, the current certificate over mTLS for renewals), renewed
//! at half of its remaining life with jittered retries, and swapped in for new handshakes.

pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use ferry_api::identity::unix_now;
use ferry_api::resources::pb;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::identity::tls::{Credentials, MeshTls};
use crate::settings::ControlSettings;
use crate::telemetry::metrics::Metrics;

/// Retries after a failed request grow from the first to the last (each jittered), but never past a quarter of the
/// certificate's remaining life.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read FERRY_CA_ROOT {0}: {1}")]
    Root(String, std::io::Error),
    #[error("key or request generation failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the issued certificate is unusable: {0}")]
    Issued(String),
}

/// Pure: how long to wait before renewing a certificate with `remaining` life: half of it, less up to 10 % jitter
/// (`jitter` in [0, 1)) so that proxies started together do not renew together.
pub fn renewal_delay(remaining: Duration, jitter: f64) -> Duration {
    (remaining / 2).mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0))
}

/// Pure: the wait before retry number `attempt` (0-based) with `remaining` certificate life: exponential with
/// jitter, hurried to a quarter of the life left while there is some (at least 200 ms apart); with none left (or no
/// certificate yet) plain backoff, so that an outage of the control plane is not met by a storm of requests.
pub fn retry_delay(attempt: u32, remaining: Duration, jitter: f64) -> Duration {
    let base = RETRY.0.saturating_mul(1u32 << attempt.min(16)).min(RETRY.1);
    let jittered = base.mul_f64(1.0 + 0.5 * jitter.clamp(0.0, 1.0));
    if remaining.is_zero() {
        return jittered;
    }
    jittered.min((remaining / 4).max(Duration::from_millis(200)))
}

/// Keeps this proxy's certificate fresh for the life of the process.
pub async fn run(control: ControlSettings, tls: Arc<MeshTls>, metrics: Arc<Metrics>) {
    let mut attempt = 0u32;
    // After a renewal refused as unauthenticated (a certificate from before an upgrade, whose lineage the control
    // plane no longer accepts), the next requests use the bootstrap credential again until one succeeds.
    let mut by_bootstrap = false;
    loop {
        let state = tls.current();
        let current = state.as_ref().map(|s| s.credentials.clone()).filter(|_| !by_bootstrap);
        let bundle = state.map(|s| s.roots_pem.clone()).unwrap_or_default();
        let remaining = |c: &Option<Credentials>| {
            c.as_ref().map(|c| Duration::from_secs((c.info.not_after - unix_now()).max(0) as u64)).unwrap_or_default()
        };
        match certify(&control, current.as_ref(), &bundle).await {
            Ok((credentials, bundle)) => {
                attempt = 0;
                by_bootstrap = false;
                let info = credentials.info.clone();
                // The CSR answer's bundle bootstraps trust, and during a root rotation it may hold a root this proxy
                // has not had over xDS yet (the one its new certificate chains to): taken when it adds a root. Roots
                // are only ever retired over xDS.
                let held = tls.current().map(|s| s.roots_pem.clone()).unwrap_or_default();
                if bundle.iter().any(|root| !held.contains(root))
                    && let Err(e) = tls.set_trust_bundle(bundle)
                {
                    tracing::error!(error = %e, "the trust bundle from the CSR service is unusable");
                }
                let taken = tls.set_credentials(credentials).and_then(|()| match tls.current() {
                    Some(_) => Ok(()),
                    None => Err(rustls::Error::General("no usable trust bundle to go with it".into())),
                });
                if let Err(e) = taken {
                    tracing::error!(error = %e, "the issued certificate cannot be used for TLS");
                    metrics.identity_renewals.with_label_values(&["error"]).inc();
                    tokio::time::sleep(retry_delay(0, Duration::from_secs(60), crate::util::random_fraction())).await;
                    continue;
                }
                metrics.identity_renewals.with_label_values(&["ok"]).inc();
                metrics.identity_expiry.set(info.not_after);
                let life = Duration::from_secs((info.not_after - unix_now()).max(0) as u64);
                let wait = renewal_delay(life, crate::util::random_fraction());
                tracing::info!(identity = %info.identity, serial = %info.serial, not_after = info.not_after, renew_in_ms = wait.as_millis() as u64, "workload certificate in use");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                metrics.identity_renewals.with_label_values(&["error"]).inc();
                if current.is_some()
                    && matches!(&e, CertifyError::Status(s) if s.code() == tonic::Code::Unauthenticated)
                {
                    by_bootstrap = true;
                }
                let left = remaining(&tls.current().map(|s| s.credentials.clone()));
                let wait = retry_delay(attempt, left, crate::util::random_fraction());
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, remaining_s = left.as_secs(), "certificate request failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The TLS a proxy speaks to the control plane: the server must chain to `FERRY_CA_ROOT` or to a root of the trust
/// bundle held (after a root rotation the control plane's certificate chains to the new root); with `client`, mTLS.
pub fn control_plane_tls(
    control: &ControlSettings,
    bundle: &[String],
    client: Option<&Credentials>,
) -> Result<ClientTlsConfig, (String, std::io::Error)> {
    let root = std::fs::read(&control.ca_root).map_err(|e| (control.ca_root.display().to_string(), e))?;
    let roots = std::iter::once(Certificate::from_pem(root)).chain(bundle.iter().map(Certificate::from_pem));
    let tls = ClientTlsConfig::new().ca_certificates(roots).domain_name(control.server_name.clone());
    Ok(match client {
        Some(c) => tls.identity(tonic::transport::Identity::from_pem(c.chain_pem.concat(), c.key_pem.clone())),
        None => tls,
    })
}

/// One CSR round trip: a fresh key, a request for it, the signed chain and the current trust bundle. Authenticated by
/// `current` (mTLS) while it is valid, else by the join token.
async fn certify(
    control: &ControlSettings,
    current: Option<&Credentials>,
    bundle: &[String],
) -> Result<(Credentials, Vec<String>), CertifyError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?;
    let valid = current.filter(|c| c.info.not_after > unix_now() + 1);
    let tls = control_plane_tls(control, bundle, valid).map_err(|(path, e)| CertifyError::Root(path, e))?;
    let channel = Endpoint::from_shared(format!("https://{}", control.addr))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .connect()
        .await?;
    let mut request = tonic::Request::new(pb::CertifyRequest { csr_pem: csr });
    if valid.is_none() {
        let token = control.credential.token().map_err(tonic::Status::unavailable)?;
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("the bootstrap token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", bearer);
    }
    let response = pb::identity_client::IdentityClient::new(channel).certify(request).await?.into_inner();
    let leaf = response
        .chain_pem
        .first()
        .and_then(|pem| ferry_api::identity::pem_certificates(pem).ok())
        .and_then(|ders| ders.into_iter().next())
        .ok_or_else(|| CertifyError::Issued("no certificate in the answer".into()))?;
    let info = ferry_api::identity::inspect(&leaf).map_err(|e| CertifyError::Issued(e.to_string()))?;
    let credentials = Credentials {
        chain_pem: response.chain_pem,
        key_pkcs8: key.serialize_der(),
        key_pem: key.serialize_pem(),
        info,
    };
    Ok((credentials, response.trust_bundle_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_and_retry_bounds() {
        let day = Duration::from_secs(86_400);
        assert_eq!(renewal_delay(day, 0.0), day / 2);
        assert_eq!(renewal_delay(day, 0.999_999).as_secs(), (day / 2).mul_f64(0.9).as_secs());
        assert!(renewal_delay(Duration::from_secs(6), 0.5) >= Duration::from_millis(2700));
        // Retries grow 0.5 s, 1 s, 2 s ... capped at 30 s (+50 % jitter), and never beyond a quarter of the life left.
        let table = [(0, 0.0, 500), (1, 0.0, 1000), (3, 0.0, 4000), (10, 0.0, 30_000), (10, 0.999_999, 44_999)];
        for (attempt, jitter, ms) in table {
            assert_eq!(retry_delay(attempt, day, jitter).as_millis(), ms, "attempt {attempt}");
        }
        assert_eq!(retry_delay(10, Duration::from_secs(8), 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(10, Duration::from_millis(1), 0.0), Duration::from_millis(200));
        assert_eq!(retry_delay(10, Duration::ZERO, 0.0), Duration::from_secs(30), "expired: plain backoff");
    }
}
