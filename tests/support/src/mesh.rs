//! Helpers for tests of the mesh itself: Services, proxies joined to a control plane, CSRs, and a mesh client of the
//! test's own that reads what a proxy presents.

use std::net::SocketAddr;
use std::sync::Arc;

use ferry_api::resources::pb;

use crate::Ferry;
use crate::control::ControlPlane;

pub fn service(name: &str, addresses: &str, extra: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80, protocol: http}}]\n  addresses: [{addresses}]\n  identities: [{name}]\n{extra}"
    )
}

/// A proxy connected to `cp` as `default/<account>`; with `app`, the endpoint of Service `<account>` (advertising
/// `advertise` as its inbound port when a relay sits in front of it).
pub fn proxy(cp: &ControlPlane, account: &str, app: Option<SocketAddr>, extra: &[(&str, String)]) -> Ferry {
    let token = cp.join_token("default", account, "1h");
    let mut env = cp.proxy_env(&token);
    env.push(("FERRY_NODE_ID".into(), account.into()));
    if let Some(app) = app {
        env.push(("FERRY_SERVICE".into(), account.into()));
        env.push(("FERRY_APP_ADDR".into(), app.to_string()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Ferry::start(None, &env)
}

/// A CSR client for the control plane's identity service, with a join token or a client certificate.
pub async fn certify(
    cp: &ControlPlane,
    csr_pem: String,
    token: Option<&str>,
    client: Option<(String, String)>,
) -> Result<pb::CertifyResponse, tonic::Status> {
    certify_at(cp.xds, &cp.state.join("ca.crt"), csr_pem, token, client).await
}

/// [`certify`] against the control plane at `xds` whose root is in the file `root`.
pub async fn certify_at(
    xds: SocketAddr,
    root: &std::path::Path,
    csr_pem: String,
    token: Option<&str>,
    client: Option<(String, String)>,
) -> Result<pb::CertifyResponse, tonic::Status> {
    let channel = identity_channel(xds, root, client, None).await;
    certify_on(channel, csr_pem, token).await
}

/// A channel to the control plane's identity service at `xds` (root in the file `root`), from `local` if given.
pub async fn identity_channel(
    xds: SocketAddr,
    root: &std::path::Path,
    client: Option<(String, String)>,
    local: Option<std::net::IpAddr>,
) -> tonic::transport::Channel {
    let root = std::fs::read(root).unwrap();
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    tonic::transport::Endpoint::from_shared(format!("https://{xds}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .local_address(local)
        .connect()
        .await
        .unwrap()
}

/// One certificate request on `channel`, with a bearer token if given.
pub async fn certify_on(
    channel: tonic::transport::Channel,
    csr_pem: String,
    token: Option<&str>,
) -> Result<pb::CertifyResponse, tonic::Status> {
    let mut request = tonic::Request::new(pb::CertifyRequest { csr_pem });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    pb::identity_client::IdentityClient::new(channel).certify(request).await.map(|r| r.into_inner())
}

/// Accepts any server certificate: the rotation probe only reads which one a proxy presents.
#[derive(Debug)]
pub struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Who a test client claims to be.
pub enum ClientCert {
    /// A mesh certificate for `default/<account>`, from the CSR service.
    Mesh(&'static str),
    /// A certificate for `default/<account>` signed by a CA the mesh does not trust.
    Foreign(&'static str),
    /// No client certificate (an unmeshed client's own TLS).
    None,
}

/// A TLS client of the test's own towards a proxy's inbound listener: a mesh peer (or an impostor, or an unmeshed
/// client) that offers `alpn` and accepts any server certificate, so that it can read which one was presented.
pub struct Probe {
    config: Arc<rustls::ClientConfig>,
}

impl Probe {
    pub async fn new(cp: &ControlPlane, cert: ClientCert, alpn: &[u8]) -> Probe {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
        let key = rcgen::KeyPair::generate().unwrap();
        let pkcs8 = || rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config = match cert {
            ClientCert::Mesh(account) => {
                let token = tokio::task::block_in_place(|| cp.join_token("default", account, "1h"));
                let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
                let issued = certify(cp, csr.pem().unwrap(), Some(&token), None).await.unwrap();
                let chain = ferry_api::identity::pem_certificates(&issued.chain_pem[0]).unwrap();
                let chain = chain.into_iter().map(rustls::pki_types::CertificateDer::from).collect();
                builder.with_client_auth_cert(chain, pkcs8()).unwrap()
            }
            ClientCert::Foreign(account) => {
                let ca_key = rcgen::KeyPair::generate().unwrap();
                let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                let issuer = rcgen::Issuer::new(ca, ca_key);
                let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                let spiffe = format!("spiffe://cluster.local/ns/default/sa/{account}");
                leaf.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().unwrap())];
                let cert = leaf.signed_by(&key, &issuer).unwrap();
                builder.with_client_auth_cert(vec![cert.der().clone()], pkcs8()).unwrap()
            }
            ClientCert::None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Probe { config: Arc::new(config) }
    }

    /// A new TLS connection to `addr` with SNI `sni`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        sni: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        tokio_rustls::TlsConnector::from(self.config.clone()).connect(name, tcp).await
    }

    /// The certificate (DER) a proxy's inbound listener presents to a new handshake.
    pub async fn served_certificate(&self, inbound: SocketAddr) -> Vec<u8> {
        let tls = self.connect(inbound, "80.api.default.ferry.internal").await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    /// The serial of the certificate a proxy's inbound listener presents to a new handshake.
    pub async fn served_serial(&self, inbound: SocketAddr) -> String {
        ferry_api::identity::inspect(&self.served_certificate(inbound).await).unwrap().serial
    }

    /// The issuer (DN) of the certificate a proxy's inbound listener presents to a new handshake.
    pub async fn served_issuer(&self, inbound: SocketAddr) -> String {
        use x509_parser::prelude::FromDer;
        let der = self.served_certificate(inbound).await;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        cert.issuer().to_string()
    }

    /// Writes `data` over a new connection and reads until the peer closes: what came back (an error or an empty
    /// answer means the connection was refused).
    pub async fn exchange(&self, addr: SocketAddr, sni: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = self.connect(addr, sni).await?;
        tls.write_all(data).await?;
        tls.flush().await?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) => return Ok(out),
                Ok(Ok(n)) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() >= data.len() {
                        return Ok(out);
                    }
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }
}
