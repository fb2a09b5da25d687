//! The authenticated handshake every internal link starts with.
//!
//! ```text
//! accepting side                      connecting side
//!   Challenge{nonce_s, version}  -->
//!                               <--   Hello{role, node_id, nonce_c, proof_c}
//!   (verify proof_c; on failure LinkError{1001} and close)
//!   Welcome{proof_s, node_id}    -->
//!                                     (verify proof_s)
//! ```
//! Until `Welcome`, frames are capped at 4 KiB and the whole exchange at a
//! timeout, so an unauthenticated peer can cost us neither memory nor a task
//! for long. Nothing but `Hello` is accepted before authentication.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gw_protocol::auth::{self, Side, Transcript, NONCE_LEN};
use gw_protocol::codes;
use gw_protocol::pb::{self, link_frame::Body, Role};
use gw_protocol::PROTOCOL_VERSION;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::{error_frame, frame, FramedLink, LinkCodec, LinkError, LinkStream, LinkTls};

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake timed out")]
    Timeout,
    #[error("peer closed the connection during the handshake")]
    Closed,
    #[error("peer failed authentication (wrong cluster secret?)")]
    BadProof,
    #[error("peer speaks protocol version {0}, we speak {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("unexpected frame during the handshake: {0}")]
    Unexpected(&'static str),
    #[error("peer refused us: code {code}: {message}")]
    Refused { code: u32, message: String },
    #[error("peer role {0} is not allowed here")]
    Role(i32),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// The authenticated peer of an accepted link.
#[derive(Debug, Clone)]
pub struct Peer {
    pub role: Role,
    pub node_id: String,
    pub addr: SocketAddr,
}

fn nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

async fn next(link: &mut FramedLink) -> Result<Body, HandshakeError> {
    match link.next().await {
        None => Err(HandshakeError::Closed),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(f)) => f.body.ok_or(HandshakeError::Unexpected("empty frame")),
    }
}

/// Runs the accepting side. `allowed` lists the roles this listener serves.
/// On success the codec's cap is raised to `max_frame`.
pub async fn accept(
    stream: TcpStream,
    secret: &[u8],
    node_id: &str,
    allowed: &[Role],
    max_frame: usize,
    timeout: Duration,
) -> Result<(FramedLink, Peer), HandshakeError> {
    accept_with(stream, None, secret, node_id, allowed, max_frame, timeout).await
}

/// [`accept`], serving TLS first when `tls` is given.
pub async fn accept_with(
    stream: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    secret: &[u8],
    node_id: &str,
    allowed: &[Role],
    max_frame: usize,
    timeout: Duration,
) -> Result<(FramedLink, Peer), HandshakeError> {
    let addr = stream.peer_addr().map_err(LinkError::from)?;
    let _ = stream.set_nodelay(true);
    let stream = match tls {
        None => LinkStream::Plain(stream),
        Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => LinkStream::Server(Box::new(s)),
            Ok(Err(e)) => return Err(HandshakeError::Link(LinkError::Io(e))),
            Err(_) => return Err(HandshakeError::Timeout),
        },
    };
    let mut link = Framed::new(stream, LinkCodec::handshake());
    let result = tokio::time::timeout(
        timeout,
        accept_inner(&mut link, secret, node_id, allowed, addr),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout));
    match result {
        Ok(peer) => {
            link.codec_mut().max_frame = max_frame;
            Ok((link, peer))
        }
        Err(e) => {
            let code = match &e {
                HandshakeError::BadProof | HandshakeError::Role(_) => codes::LINK_AUTH_FAILED,
                HandshakeError::Version(_) => codes::LINK_VERSION_MISMATCH,
                HandshakeError::Timeout => codes::LINK_HANDSHAKE_TIMEOUT,
                HandshakeError::Link(LinkError::Frame(f)) => f.code(),
                _ => codes::LINK_UNEXPECTED,
            };
            // Best effort: the peer may already be gone.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                link.send(error_frame(code, e.to_string())),
            )
            .await;
            Err(e)
        }
    }
}

async fn accept_inner(
    link: &mut FramedLink,
    secret: &[u8],
    node_id: &str,
    allowed: &[Role],
    addr: SocketAddr,
) -> Result<Peer, HandshakeError> {
    let server_nonce = nonce();
    link.send(frame(Body::Challenge(pb::Challenge {
        nonce: server_nonce.to_vec().into(),
        protocol_version: PROTOCOL_VERSION,
    })))
    .await?;
    let hello = match next(link).await? {
        Body::Hello(h) => h,
        _ => return Err(HandshakeError::Unexpected("expected Hello")),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(hello.protocol_version));
    }
    let transcript = Transcript {
        role: hello.role,
        node_id: &hello.node_id,
        server_nonce: &server_nonce,
        client_nonce: &hello.nonce,
    };
    if hello.nonce.len() != NONCE_LEN
        || !auth::verify(secret, Side::Connecting, &transcript, &hello.proof)
    {
        return Err(HandshakeError::BadProof);
    }
    let role = Role::try_from(hello.role).map_err(|_| HandshakeError::Role(hello.role))?;
    if !allowed.contains(&role) {
        return Err(HandshakeError::Role(hello.role));
    }
    let proof = auth::prove(secret, Side::Accepting, &transcript);
    link.send(frame(Body::Welcome(pb::Welcome {
        proof: proof.into(),
        node_id: node_id.to_string(),
    })))
    .await?;
    Ok(Peer {
        role,
        node_id: hello.node_id,
        addr,
    })
}

/// Connects to `addr` and runs the connecting side. Returns the link and the
/// accepting side's node id.
pub async fn connect(
    addr: &str,
    secret: &[u8],
    role: Role,
    node_id: &str,
    max_frame: usize,
    timeout: Duration,
) -> Result<(FramedLink, String), HandshakeError> {
    connect_with(
        addr,
        &LinkTls::default(),
        secret,
        role,
        node_id,
        max_frame,
        timeout,
    )
    .await
}

/// [`connect`], over TLS when `tls` has a connector.
pub async fn connect_with(
    addr: &str,
    tls: &LinkTls,
    secret: &[u8],
    role: Role,
    node_id: &str,
    max_frame: usize,
    timeout: Duration,
) -> Result<(FramedLink, String), HandshakeError> {
    tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(addr).await.map_err(LinkError::from)?;
        let _ = tcp.set_nodelay(true);
        let stream = match &tls.connector {
            None => LinkStream::Plain(tcp),
            Some((connector, name)) => LinkStream::Client(Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(LinkError::from)?,
            )),
        };
        let mut link = Framed::new(stream, LinkCodec::handshake());
        let challenge = match next(&mut link).await? {
            Body::Challenge(c) => c,
            Body::Error(e) => {
                return Err(HandshakeError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            _ => return Err(HandshakeError::Unexpected("expected Challenge")),
        };
        if challenge.protocol_version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version(challenge.protocol_version));
        }
        let client_nonce = nonce();
        let transcript = Transcript {
            role: role as i32,
            node_id,
            server_nonce: &challenge.nonce,
            client_nonce: &client_nonce,
        };
        link.send(frame(Body::Hello(pb::Hello {
            role: role as i32,
            node_id: node_id.to_string(),
            nonce: client_nonce.to_vec().into(),
            proof: auth::prove(secret, Side::Connecting, &transcript).into(),
            protocol_version: PROTOCOL_VERSION,
        })))
        .await?;
        match next(&mut link).await? {
            Body::Welcome(w) => {
                if !auth::verify(secret, Side::Accepting, &transcript, &w.proof) {
                    return Err(HandshakeError::BadProof);
                }
                link.codec_mut().max_frame = max_frame;
                Ok((link, w.node_id))
            }
            Body::Error(e) => Err(HandshakeError::Refused {
                code: e.code,
                message: e.message,
            }),
            _ => Err(HandshakeError::Unexpected("expected Welcome")),
        }
    })
    .await
    .unwrap_or(Err(HandshakeError::Timeout))
}
