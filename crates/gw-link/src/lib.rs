//! Internal links of gateworker on tokio.
//!
//! The protocol crate knows how to frame, prove and validate; this crate
//! only drives it over TCP: [`LinkCodec`] adapts the sans-IO frame functions
//! to `tokio_util::codec`, [`handshake`] runs the challenge-response on a
//! fresh connection, and [`Backoff`] spaces out reconnects.
#![forbid(unsafe_code)]

pub mod admin;
pub mod discovery;
pub mod handshake;
pub mod tls;

use std::time::Duration;

use bytes::BytesMut;
use gw_protocol::frame::{self, FrameError};
use gw_protocol::pb::{self, link_frame::Body, LinkFrame};
use tokio_util::codec::{Decoder, Encoder, Framed};

pub use gw_protocol::frame::DEFAULT_MAX_FRAME;
pub use handshake::{accept, accept_with, connect, connect_with, HandshakeError, Peer};
pub use tls::{LinkStream, LinkTls};

/// A connection (TCP, or TLS over TCP) speaking link frames.
pub type FramedLink = Framed<tls::LinkStream, LinkCodec>;

/// `tokio_util` codec over [`gw_protocol::frame`], with a size cap that is
/// small during the handshake and raised once the peer is authenticated.
#[derive(Debug, Clone)]
pub struct LinkCodec {
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
}

impl LinkCodec {
    /// A codec for the handshake phase.
    pub fn handshake() -> Self {
        LinkCodec {
            max_frame: frame::HANDSHAKE_MAX_FRAME,
        }
    }
}

/// An I/O or framing failure on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl Decoder for LinkCodec {
    type Item = LinkFrame;
    type Error = LinkError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<LinkFrame>, LinkError> {
        Ok(frame::decode(src, self.max_frame)?)
    }
}

impl Encoder<LinkFrame> for LinkCodec {
    type Error = LinkError;
    fn encode(&mut self, item: LinkFrame, dst: &mut BytesMut) -> Result<(), LinkError> {
        Ok(frame::encode(&item, self.max_frame, dst)?)
    }
}

/// Wraps a body into a frame.
pub fn frame(body: Body) -> LinkFrame {
    LinkFrame { body: Some(body) }
}

/// A fatal error frame with `code`.
pub fn error_frame(code: u32, message: impl Into<String>) -> LinkFrame {
    frame(Body::Error(pb::LinkError {
        code,
        message: message.into(),
    }))
}

/// Exponential reconnect backoff with jitter: 100 ms doubling to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to 25% jitter so that a restarted register is not hit by every
        // peer in the same millisecond.
        let jitter = rand::random_range(0..=base.as_millis() as u64 / 4);
        base + Duration::from_millis(jitter)
    }

    /// Start again from the shortest delay (after a successful connect).
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}
