//! TLS on the xDS port, terminated here rather than by tonic so that the serving certificate and the client roots
//! (the trust bundle) can change at run time — a root rotation needs no restart. Client certificates are optional at
//! this layer (a first CSR comes with a join token); each connection hands its verified chain to the handlers.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A TLS handshake must finish within this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's address and verified certificate chain, as handlers find them in request extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("serving certificate or key: {0}")]
    Pem(String),
    #[error("{0}")]
    Tls(#[from] rustls::Error),
}

/// The live server configuration of the xDS port, and of the admission webhook (the same certificate, no client
/// certificates, HTTP/1.1).
pub struct ServingTls {
    config: RwLock<Arc<ServerConfig>>,
    webhook: RwLock<Arc<ServerConfig>>,
}

fn webhook_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, ServingError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (chain, key) = chain_and_key(cert_pem, key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type ChainAndKey = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn chain_and_key(cert_pem: &str, key_pem: &str) -> Result<ChainAndKey, ServingError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServingError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ServingError::Pem(e.to_string()))?;
    Ok((chain, key))
}

fn server_config(cert_pem: &str, key_pem: &str, roots_pem: &[String]) -> Result<Arc<ServerConfig>, ServingError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for pem in roots_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.map_err(|e| ServingError::Pem(e.to_string()))?)?;
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServingError::Tls(rustls::Error::General(e.to_string())))?;
    let (chain, key) = chain_and_key(cert_pem, key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl ServingTls {
    pub fn new(cert_pem: &str, key_pem: &str, roots_pem: &[String]) -> Result<Arc<ServingTls>, ServingError> {
        Ok(Arc::new(ServingTls {
            config: RwLock::new(server_config(cert_pem, key_pem, roots_pem)?),
            webhook: RwLock::new(webhook_config(cert_pem, key_pem)?),
        }))
    }

    /// New handshakes use these from now on; open connections keep theirs.
    pub fn update(&self, cert_pem: &str, key_pem: &str, roots_pem: &[String]) -> Result<(), ServingError> {
        *self.config.write().expect("tls lock") = server_config(cert_pem, key_pem, roots_pem)?;
        *self.webhook.write().expect("tls lock") = webhook_config(cert_pem, key_pem)?;
        Ok(())
    }

    /// The admission webhook's current server configuration (renewed with the xDS serving certificate).
    pub fn webhook(&self) -> Arc<ServerConfig> {
        self.webhook.read().expect("tls lock").clone()
    }

    /// The accepted, handshaken connections of `listener`, for `serve_with_incoming`. Handshakes run concurrently;
    /// failed ones (an expired certificate, one from an unknown or retired root) are logged and counted in
    /// `ferry_control_xds_refused_total{reason="tls"}`.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        metrics: Arc<crate::metrics::ControlMetrics>,
    ) -> ReceiverStream<Result<TlsConn, io::Error>> {
        let (tx, rx) = mpsc::channel(128);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "xDS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let config = self.config.read().expect("tls lock").clone();
                let (tx, metrics) = (tx.clone(), metrics.clone());
                tokio::spawn(async move {
                    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(TlsConn { stream, remote })).await;
                        }
                        Ok(Err(e)) => {
                            metrics.xds_refused.with_label_values(&["tls"]).inc();
                            tracing::info!(peer = %remote, error = %e, "TLS handshake on the xDS port failed");
                        }
                        Err(_) => {
                            metrics.xds_refused.with_label_values(&["tls"]).inc();
                            tracing::info!(peer = %remote, "TLS handshake on the xDS port timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// One accepted TLS connection.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let certs = self.stream.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
        PeerInfo { remote: Some(self.remote), certs }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
