//! The three client protocols behind one reader and one writer type:
//! WebSocket (`ws`), newline-delimited text over TCP (`text`) and
//! `u32`-length-prefixed frames over TCP (`frame`).

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::hub::Outbound;

/// Something that arrived from a client.
#[derive(Debug)]
pub(crate) enum Inbound {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A ping or pong: proof of life, nothing for the worker.
    Activity,
    /// The client said goodbye.
    Close,
}

/// A client read failure (protocol error, oversized message, I/O).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
}

impl ReadError {
    /// Whether the client broke a size limit (close code 1009).
    pub(crate) fn too_big(&self) -> bool {
        use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
        match self {
            ReadError::Ws(Error::Capacity(CapacityError::MessageTooLong { .. })) => true,
            ReadError::LineTooLong(_) => true,
            ReadError::Io(e) => e.kind() == std::io::ErrorKind::InvalidData,
            _ => false,
        }
    }
}

pub(crate) type Ws = WebSocketStream<super::tls::ClientStream>;

pub(crate) enum ClientRead {
    Ws(SplitStream<Ws>),
    Text(FramedRead<OwnedReadHalf, TextCodec>),
    Frame(FramedRead<OwnedReadHalf, LengthDelimitedCodec>),
}

pub(crate) enum ClientWrite {
    Ws(SplitSink<Ws, Message>),
    Text(FramedWrite<OwnedWriteHalf, TextCodec>),
    Frame(FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>),
}

/// Text if it is UTF-8, binary otherwise (for the TCP protocols, which
/// carry bytes).
fn classify(b: Bytes) -> Inbound {
    match Utf8Bytes::try_from(b.clone()) {
        Ok(t) => Inbound::Text(t),
        Err(_) => Inbound::Binary(b),
    }
}

impl ClientRead {
    pub(crate) async fn next(&mut self) -> Option<Result<Inbound, ReadError>> {
        match self {
            ClientRead::Ws(s) => s.next().await.map(|r| {
                r.map(|m| match m {
                    Message::Text(t) => Inbound::Text(t),
                    Message::Binary(b) => Inbound::Binary(b),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Inbound::Activity,
                    Message::Close(_) => Inbound::Close,
                })
                .map_err(ReadError::from)
            }),
            ClientRead::Text(s) => s.next().await.map(|r| r.map(classify)),
            ClientRead::Frame(s) => s
                .next()
                .await
                .map(|r| r.map(|b| classify(b.freeze())).map_err(ReadError::from)),
        }
    }
}

impl ClientWrite {
    /// Queues one message without flushing.
    pub(crate) async fn feed(&mut self, msg: Outbound) -> Result<(), ReadError> {
        match self {
            ClientWrite::Ws(s) => {
                let m = match msg {
                    Outbound::Text(t) => Message::Text(t),
                    Outbound::Binary(b) => Message::Binary(b),
                };
                s.feed(m).await?;
            }
            ClientWrite::Text(s) => s.feed(outbound_bytes(msg)).await?,
            ClientWrite::Frame(s) => s.feed(outbound_bytes(msg)).await?,
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ReadError> {
        match self {
            ClientWrite::Ws(s) => s.flush().await?,
            ClientWrite::Text(s) => s.flush().await?,
            ClientWrite::Frame(s) => SinkExt::<Bytes>::flush(s).await?,
        }
        Ok(())
    }

    /// A heartbeat: a WebSocket ping, or the configured ping data as an
    /// ordinary message (the only kind a TCP protocol has).
    pub(crate) async fn ping(&mut self, data: Option<&Bytes>) -> Result<(), ReadError> {
        match (self, data) {
            (ClientWrite::Ws(s), Some(d)) => {
                let t = Utf8Bytes::try_from(d.clone()).unwrap_or_default();
                s.send(Message::Text(t)).await?
            }
            (ClientWrite::Ws(s), None) => s.send(Message::Ping(Bytes::new())).await?,
            (ClientWrite::Text(s), Some(d)) => s.send(d.clone()).await?,
            (ClientWrite::Frame(s), Some(d)) => s.send(d.clone()).await?,
            _ => {}
        }
        Ok(())
    }

    /// Closes the connection; WebSocket clients get a close frame with `code`.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) {
        match self {
            ClientWrite::Ws(s) => {
                let _ = s
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    })))
                    .await;
                let _ = s.close().await;
            }
            ClientWrite::Text(s) => {
                let _ = s.close().await;
            }
            ClientWrite::Frame(s) => {
                let _ = SinkExt::<Bytes>::close(s).await;
            }
        }
    }
}

fn outbound_bytes(msg: Outbound) -> Bytes {
    match msg {
        Outbound::Text(t) => Bytes::from(t),
        Outbound::Binary(b) => b,
    }
}

/// Splits a TCP stream for the `text` protocol.
pub(crate) fn text(stream: TcpStream, max_line: usize) -> (ClientRead, ClientWrite) {
    let (r, w) = stream.into_split();
    let codec = TextCodec { max_line };
    (
        ClientRead::Text(FramedRead::new(r, codec.clone())),
        ClientWrite::Text(FramedWrite::new(w, codec)),
    )
}

/// Splits a TCP stream for the `frame` protocol.
pub(crate) fn frame(stream: TcpStream, max_frame: usize) -> (ClientRead, ClientWrite) {
    let (r, w) = stream.into_split();
    let codec = || {
        LengthDelimitedCodec::builder()
            .length_field_length(4)
            .big_endian()
            .max_frame_length(max_frame)
            .new_codec()
    };
    (
        ClientRead::Frame(FramedRead::new(r, codec())),
        ClientWrite::Frame(FramedWrite::new(w, codec())),
    )
}

/// Newline-delimited messages; a trailing `\r` is dropped, empty lines are
/// skipped, a line over `max_line` bytes is an error (not an allocation).
#[derive(Debug, Clone)]
pub(crate) struct TextCodec {
    max_line: usize,
}

impl Decoder for TextCodec {
    type Item = Bytes;
    type Error = ReadError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, ReadError> {
        loop {
            let Some(pos) = src.iter().position(|b| *b == b'\n') else {
                if src.len() > self.max_line {
                    return Err(ReadError::LineTooLong(self.max_line));
                }
                return Ok(None);
            };
            if pos > self.max_line {
                return Err(ReadError::LineTooLong(self.max_line));
            }
            let mut line = src.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            if line.is_empty() {
                continue;
            }
            return Ok(Some(line.freeze()));
        }
    }
}

impl Encoder<Bytes> for TextCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.reserve(item.len() + 1);
        dst.put(item);
        dst.put_u8(b'\n');
        Ok(())
    }
}
