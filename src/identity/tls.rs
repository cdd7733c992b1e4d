//! Mesh TLS between proxies: TLS 1.3 only, ALPN `ferry/h2`|`ferry/tcp`, the target port in SNI, client certificates
//! required and checked against the trust bundle, the server's SPIFFE ID checked against the destination's.
//! Certificate and bundle are hot-swapped: new handshakes use the new ones, open connections keep theirs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use ferry_api::identity::{self, CertInfo, Identity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::errors::TlsError;

pub const ALPN_H2: &[u8] = b"ferry/h2";
pub const ALPN_TCP: &[u8] = b"ferry/tcp";
/// SNI suffix of mesh connections: `<port>.<service>.<namespace>.ferry.internal`.
pub const SNI_SUFFIX: &str = ".ferry.internal";

/// What a mesh connection carries, chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP of any version, multiplexed as HTTP/2 between proxies.
    H2,
    /// Opaque bytes.
    Tcp,
}

impl Alpn {
    pub fn of(protocol: &[u8]) -> Option<Alpn> {
        match protocol {
            ALPN_H2 => Some(Alpn::H2),
            ALPN_TCP => Some(Alpn::Tcp),
            _ => None,
        }
    }
}

/// The SNI naming a destination's target port: `<port>.<service>.<namespace>.ferry.internal`.
pub fn sni(port: u16, service: &str, namespace: &str) -> String {
    format!("{port}.{service}.{namespace}{SNI_SUFFIX}")
}

/// Pure: the target port an inbound mesh connection's SNI names.
pub fn sni_port(sni: &str) -> Option<u16> {
    let rest = sni.strip_suffix(SNI_SUFFIX)?;
    let (port, _) = rest.split_once('.')?;
    ferry_api::port_number(port).filter(|p| *p != 0)
}

/// This proxy's certificate and key as issued, in memory only.
#[derive(Clone)]
pub struct Credentials {
    /// Leaf first.
    pub chain_pem: Vec<String>,
    pub key_pkcs8: Vec<u8>,
    pub key_pem: String,
    pub info: CertInfo,
}

/// The TLS configurations in force for new handshakes.
pub struct TlsState {
    /// Bumped on every change: pooled connections of an older generation take no new requests.
    pub generation: u64,
    pub credentials: Credentials,
    pub roots_pem: Vec<String>,
    pub server: Arc<ServerConfig>,
    client_h2: Arc<ClientConfig>,
    client_tcp: Arc<ClientConfig>,
}

impl TlsState {
    pub fn identity(&self) -> &Identity {
        &self.credentials.info.identity
    }
}

#[derive(Default)]
struct Parts {
    credentials: Option<Credentials>,
    roots_pem: Vec<String>,
}

/// The live mesh TLS state; `None` until both a certificate and a trust bundle are held.
pub struct MeshTls {
    state: ArcSwapOption<TlsState>,
    parts: Mutex<Parts>,
    generation: AtomicU64,
    ready: watch::Sender<bool>,
    /// The serial of the certificate in use (changes at each renewal).
    serial: watch::Sender<Option<String>>,
}

impl Default for MeshTls {
    fn default() -> Self {
        MeshTls {
            state: ArcSwapOption::empty(),
            parts: Mutex::default(),
            generation: AtomicU64::new(0),
            ready: watch::channel(false).0,
            serial: watch::channel(None).0,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl MeshTls {
    pub fn current(&self) -> Option<Arc<TlsState>> {
        self.state.load_full()
    }

    /// Resolves once an identity and a trust bundle are held (from then on there always are).
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Changes whenever a new certificate is taken into use.
    pub fn subscribe_serial(&self) -> watch::Receiver<Option<String>> {
        self.serial.subscribe()
    }

    pub fn set_credentials(&self, credentials: Credentials) -> Result<(), rustls::Error> {
        let mut parts = self.parts.lock().expect("tls lock");
        let serial = credentials.info.serial.clone();
        let previous = parts.credentials.replace(credentials);
        self.rebuild(&parts).inspect_err(|_| {
            parts.credentials = previous;
        })?;
        self.serial.send_replace(Some(serial));
        Ok(())
    }

    /// The roots changed (xDS TrustBundle, or the CSR answer).
    pub fn set_trust_bundle(&self, roots_pem: Vec<String>) -> Result<(), rustls::Error> {
        let mut parts = self.parts.lock().expect("tls lock");
        if parts.roots_pem == roots_pem {
            return Ok(());
        }
        let previous = std::mem::replace(&mut parts.roots_pem, roots_pem);
        self.rebuild(&parts).inspect_err(|_| {
            parts.roots_pem = previous;
        })
    }

    fn rebuild(&self, parts: &Parts) -> Result<(), rustls::Error> {
        let Some(credentials) = parts.credentials.clone() else { return Ok(()) };
        if parts.roots_pem.is_empty() {
            return Ok(());
        }
        let roots = Arc::new(root_store(&parts.roots_pem)?);
        let chain: Vec<CertificateDer<'static>> = credentials
            .chain_pem
            .iter()
            .flat_map(|pem| identity::pem_certificates(pem).unwrap_or_default())
            .map(CertificateDer::from)
            .collect();
        let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(credentials.key_pkcs8.clone()));
        let provider = provider();
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_TCP.to_vec()];
        // No resumption: every handshake presents (and checks) the current certificates.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let verifier = Arc::new(MeshServerVerifier { roots, provider: provider.clone() });
        let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, rustls::Error> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_auth_cert(chain.clone(), key())?;
            c.alpn_protocols = vec![alpn.to_vec()];
            c.resumption = rustls::client::Resumption::disabled();
            Ok(Arc::new(c))
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.state.store(Some(Arc::new(TlsState {
            generation,
            roots_pem: parts.roots_pem.clone(),
            server: Arc::new(server),
            client_h2: client(ALPN_H2)?,
            client_tcp: client(ALPN_TCP)?,
            credentials,
        })));
        self.ready.send_replace(true);
        Ok(())
    }

    /// Opens a mesh connection to `addr` and checks that the server is one of `expected` (the identities the
    /// destination Service lists). Returns the stream and the TLS generation it was made with.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        peer: &PeerTls,
        alpn: Alpn,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, u64), TlsError> {
        let state = self.current().ok_or(TlsError::NoIdentity)?;
        let config = match alpn {
            Alpn::H2 => state.client_h2.clone(),
            Alpn::Tcp => state.client_tcp.clone(),
        };
        let name = ServerName::try_from(peer.sni.to_string())
            .map_err(|e| TlsError::BadPeer { addr, message: format!("SNI {}: {e}", peer.sni) })?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|source| TlsError::Handshake { addr, source })?;
        let found = peer_identity(stream.get_ref().1.peer_certificates())
            .map_err(|message| TlsError::BadPeer { addr, message })?;
        if !peer.identities.contains(&found) {
            return Err(TlsError::WrongIdentity {
                addr,
                service: peer.service.to_string(),
                found: found.spiffe(),
                expected: peer.identities.iter().map(Identity::spiffe).collect::<Vec<_>>().join(", "),
            });
        }
        Ok((stream, state.generation))
    }
}

/// The identity of a verified peer certificate chain.
pub fn peer_identity(chain: Option<&[CertificateDer<'_>]>) -> Result<Identity, String> {
    let leaf = chain.and_then(|c| c.first()).ok_or("no certificate")?;
    identity::inspect(leaf).map(|i| i.identity).map_err(|e| e.to_string())
}

/// What the client side of a mesh connection needs: the SNI to send and who may answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerTls {
    /// Shared with the Service's entry in the snapshot, as is `service`: a request builds its PeerTls (and the pool
    /// its key) without allocating.
    pub sni: Arc<str>,
    /// `name.namespace`, for messages.
    pub service: Arc<str>,
    pub identities: Arc<[Identity]>,
}

fn root_store(roots_pem: &[String]) -> Result<RootCertStore, rustls::Error> {
    let mut store = RootCertStore::empty();
    for pem in roots_pem {
        for der in identity::pem_certificates(pem).map_err(|e| rustls::Error::General(e.to_string()))? {
            store.add(CertificateDer::from(der)).map_err(|e| rustls::Error::General(format!("trust bundle: {e}")))?;
        }
    }
    Ok(store)
}

/// Checks the server's chain against the trust bundle (not its DNS names: mesh certificates carry a SPIFFE ID, which
/// `MeshTls::connect` checks against the destination once the handshake is done).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        identity::inspect(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// What a TLS ClientHello asks for (read from the bytes buffered by protocol detection, before any handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub server_name: Option<String>,
    /// The mesh protocol offered, if any `ferry/*` ALPN is.
    pub mesh: Option<Alpn>,
}

/// Parses the ClientHello at the start of `bytes` (one complete TLS record). `None`: not a parsable ClientHello.
pub fn client_hello(bytes: &[u8]) -> Option<ClientHello> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        acceptor.read_tls(&mut rd).ok()?;
    }
    let accepted = acceptor.accept().ok()??;
    let hello = accepted.client_hello();
    let mesh = hello.alpn().and_then(|mut protocols| protocols.find_map(Alpn::of));
    Some(ClientHello { server_name: hello.server_name().map(str::to_string), mesh })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trip_and_refusals() {
        assert_eq!(sni(8080, "payments", "shop"), "8080.payments.shop.ferry.internal");
        let cases = [
            ("8080.payments.shop.ferry.internal", Some(8080)),
            ("80.a.b.ferry.internal", Some(80)),
            ("0.a.b.ferry.internal", None),
            ("70000.a.b.ferry.internal", None),
            ("x.a.b.ferry.internal", None),
            ("8080.payments.shop.svc.cluster.local", None),
            ("ferry.internal", None),
            // Found by `sni_port_reads_what_sni_writes`: `u16::from_str` takes a leading `+`.
            ("+80.a.b.ferry.internal", None),
        ];
        for (name, want) in cases {
            assert_eq!(sni_port(name), want, "{name}");
        }
    }

    proptest::proptest! {
        /// The port `sni_port` reads is the one `sni` wrote, and any other name reads as the digits before its first
        /// dot, or nothing.
        #[test]
        fn sni_port_reads_what_sni_writes(
            port in 1u16..,
            service in "[a-z0-9-]{1,20}",
            namespace in "[a-z0-9-]{1,20}",
            prefix in "[0-9+x -]{0,7}",
        ) {
            proptest::prop_assert_eq!(sni_port(&sni(port, &service, &namespace)), Some(port));
            let other = format!("{prefix}.{service}.{namespace}{SNI_SUFFIX}");
            let digits = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit());
            let want = digits.then(|| prefix.parse::<u16>().ok()).flatten().filter(|p| *p != 0);
            proptest::prop_assert_eq!(sni_port(&other), want, "{:?}", other);
        }
    }
}
