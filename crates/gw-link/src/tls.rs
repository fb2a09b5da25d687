//! Optional TLS on internal links (rustls). The cluster secret already
//! authenticates every peer; TLS adds confidentiality on networks that are
//! not private. All-or-nothing per process: a process with a CA configured
//! dials every link with TLS and checks the peer's certificate against the
//! CA and the cluster's TLS name; one with a certificate serves TLS.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The TLS side of a process's internal links.
#[derive(Clone, Default)]
pub struct LinkTls {
    /// Serve TLS on accepted links.
    pub acceptor: Option<TlsAcceptor>,
    /// Dial links with TLS, verifying this server name.
    pub connector: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTls")
            .field("serves", &self.acceptor.is_some())
            .field("dials", &self.connector.is_some())
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl LinkTls {
    /// From PEM files: `cert`+`key` to serve, `ca` (and the name every
    /// internal certificate carries) to dial. Errors name the file.
    pub fn from_files(
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
        name: &str,
    ) -> Result<Self, String> {
        let mut tls = LinkTls::default();
        if let (Some(cert), Some(key)) = (cert, key) {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("link_tls_cert {cert}: {e}"))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("link_tls_cert {cert}: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("link_tls_key {key}: {e}"))?;
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| format!("link_tls_cert/link_tls_key: {e}"))?;
            tls.acceptor = Some(TlsAcceptor::from(Arc::new(config)));
        }
        if let Some(ca) = ca {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| format!("link_tls_ca {ca}: {e}"))?
            {
                roots
                    .add(c.map_err(|e| format!("link_tls_ca {ca}: {e}"))?)
                    .map_err(|e| format!("link_tls_ca {ca}: {e}"))?;
            }
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(name.to_string())
                .map_err(|e| format!("link_tls_name {name}: {e}"))?;
            tls.connector = Some((TlsConnector::from(Arc::new(config)), name));
        }
        Ok(tls)
    }
}

/// An internal link's byte stream: plain TCP or TLS either way.
pub enum LinkStream {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for LinkStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkStream::Plain(_) => "LinkStream::Plain",
            LinkStream::Server(_) => "LinkStream::Server(tls)",
            LinkStream::Client(_) => "LinkStream::Client(tls)",
        })
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            LinkStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            LinkStream::Server($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            LinkStream::Client($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}
