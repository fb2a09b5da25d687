//! `wss` listeners: TLS with rustls, the certificate and key read from PEM
//! files and re-read on SIGHUP without touching open connections (each
//! handshake uses the configuration current at its start).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The current TLS configuration, swappable at run time.
pub(crate) struct TlsConfig {
    cert_path: String,
    key_path: String,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl TlsConfig {
    /// Loads the certificate chain and key; errors name the file.
    pub(crate) fn load(cert_path: &str, key_path: &str) -> Result<Self, String> {
        let config = build(cert_path, key_path)?;
        Ok(TlsConfig {
            cert_path: cert_path.to_string(),
            key_path: key_path.to_string(),
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Re-reads the files; on error the old configuration stays.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let config = build(&self.cert_path, &self.key_path)?;
        *self.current.write() = Arc::new(config);
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }
}

fn build(cert_path: &str, key_path: &str) -> Result<rustls::ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("tls_cert {cert_path}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_cert {cert_path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("tls_cert {cert_path}: no certificate found"));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| format!("tls_key {key_path}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls_cert/tls_key: {e}"))
}

/// A client connection, plain or TLS.
pub(crate) enum ClientStream {
    /// Shared with the client's queue ([`crate::hub::ClientShared`]): a
    /// fan-out writes what it queued straight to the socket when the
    /// connection task is not writing (see [`crate::hub::FlushList`]).
    Plain(Arc<TcpStream>),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => poll_recv(s, cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => poll_sendmsg(s, cx, &[io::IoSlice::new(buf)]),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            // Nothing is buffered above the socket.
            ClientStream::Plain(_) => Poll::Ready(Ok(())),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => {
                Poll::Ready(socket2::SockRef::from(&**s).shutdown(std::net::Shutdown::Write))
            }
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => poll_sendmsg(s, cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(_) => true,
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Reads from a socket shared by reference (tokio's `AsyncRead` wants it
/// owned). An uninitialised `buf` is zeroed first; the hot path hands an
/// initialised one, so that costs nothing there.
fn poll_recv(s: &TcpStream, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
    loop {
        std::task::ready!(s.poll_read_ready(cx))?;
        // try_read clears the readiness on WouldBlock, so the next
        // poll_read_ready waits for more bytes.
        match s.try_read(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// `sendmsg` rather than tokio's `writev`: on a socket the VFS layer of
/// `writev` (file lookup with position lock, iterator setup) is pure
/// overhead, and every frame a client receives goes through here.
pub(crate) fn poll_sendmsg(
    s: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(s.poll_write_ready(cx))?;
        // try_io clears the readiness on WouldBlock, so the next
        // poll_write_ready waits for the socket to drain.
        match s.try_io(tokio::io::Interest::WRITABLE, || {
            socket2::SockRef::from(s).send_vectored(bufs)
        }) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}
