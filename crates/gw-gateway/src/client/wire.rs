//! The client wire formats, sans-IO: WebSocket frames (server side of
//! RFC 6455, no extensions), newline-delimited text and `u32`-length-
//! prefixed frames.
//!
//! Done here rather than through a WebSocket library so that
//!
//! * an outgoing message is encoded **once per fan-out** into the exact
//!   bytes every recipient on that wire gets (server frames are unmasked,
//!   so they are identical for all), and the connection writes many of them
//!   with one `writev`;
//! * an idle connection holds no read buffer: the connection reads into a
//!   stack buffer and only keeps an incomplete frame ([`Decoder::decode`]
//!   works on whatever bytes have arrived);
//! * every violation maps to a precise close code, and a length is checked
//!   against the limit before a byte of its payload is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use gw_protocol::codes;

/// Which client protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    Ws,
    Text,
    Frame,
}

impl Wire {
    pub(crate) const COUNT: usize = 3;

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Something that arrived from a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A message (UTF-8 checked).
    Text(Bytes),
    Binary(Bytes),
    /// A WebSocket ping: answered with a pong carrying `data`.
    Ping(Bytes),
    /// A WebSocket pong: proof of life, nothing else.
    Pong,
    /// The client said goodbye, with its close code if it gave one.
    Close(Option<u16>),
}

/// A client broke the protocol; the connection closes with
/// [`WireError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message longer than {0} bytes")]
    TooBig(usize),
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
}

impl WireError {
    /// The WebSocket close code for this error.
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            WireError::Protocol(_) => 1002,
            WireError::TooBig(_) => codes::CLOSE_TOO_BIG,
            WireError::InvalidUtf8 => 1007,
        }
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A fragmented WebSocket message being put together.
#[derive(Debug)]
struct Partial {
    binary: bool,
    data: BytesMut,
}

/// Splits a client's byte stream into [`Inbound`] messages.
#[derive(Debug)]
pub(crate) struct Decoder {
    wire: Wire,
    max_message: usize,
    /// Boxed: almost never used, and kept inline it would grow every
    /// connection.
    partial: Option<Box<Partial>>,
    /// `text` only: bytes of the buffer already searched for a newline.
    scanned: usize,
}

impl Decoder {
    pub(crate) fn new(wire: Wire, max_message: usize) -> Self {
        Decoder {
            wire,
            max_message,
            partial: None,
            scanned: 0,
        }
    }

    /// Takes the next complete message off the front of `src`, or `None`
    /// if more bytes are needed.
    pub(crate) fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        match self.wire {
            Wire::Ws => self.decode_ws(src),
            Wire::Text => self.decode_line(src),
            Wire::Frame => self.decode_frame(src),
        }
    }

    /// How many more bytes the frame at the front of `src` needs, when
    /// known (lets the reader size its buffer once for a large frame).
    pub(crate) fn wanted(&self, src: &[u8]) -> Option<usize> {
        let total = match self.wire {
            Wire::Ws => ws_header(src)
                .ok()
                .flatten()
                .map(|h| h.header_len + h.len as usize),
            Wire::Frame if src.len() >= 4 => {
                Some(4 + u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize)
            }
            _ => None,
        }?;
        Some(total.saturating_sub(src.len()))
    }

    fn decode_ws(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        loop {
            let Some(h) = ws_header(src)? else {
                return Ok(None);
            };
            let control = h.opcode & 0x8 != 0;
            if control {
                if !h.fin {
                    return Err(WireError::Protocol("fragmented control frame"));
                }
                if h.len > 125 {
                    return Err(WireError::Protocol("control frame longer than 125 bytes"));
                }
            } else {
                let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
                if so_far + h.len > self.max_message as u64 {
                    return Err(WireError::TooBig(self.max_message));
                }
            }
            let total = h.header_len + h.len as usize;
            if src.len() < total {
                return Ok(None);
            }
            src.advance(h.header_len);
            let mut payload = src.split_to(h.len as usize);
            unmask(&mut payload, h.mask);
            match h.opcode {
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(WireError::Protocol("new message inside a fragmented one"));
                    }
                    let binary = h.opcode == OP_BINARY;
                    if h.fin {
                        return finish(binary, payload.freeze()).map(Some);
                    }
                    self.partial = Some(Box::new(Partial {
                        binary,
                        data: payload,
                    }));
                }
                OP_CONTINUATION => {
                    let Some(p) = self.partial.as_mut() else {
                        return Err(WireError::Protocol("continuation without a message"));
                    };
                    p.data.extend_from_slice(&payload);
                    if h.fin {
                        let p = self.partial.take().expect("checked above");
                        return finish(p.binary, p.data.freeze()).map(Some);
                    }
                }
                OP_PING => return Ok(Some(Inbound::Ping(payload.freeze()))),
                OP_PONG => return Ok(Some(Inbound::Pong)),
                OP_CLOSE => {
                    return match payload.len() {
                        0 => Ok(Some(Inbound::Close(None))),
                        1 => Err(WireError::Protocol("close frame with a 1-byte body")),
                        _ => {
                            let code = u16::from_be_bytes([payload[0], payload[1]]);
                            if std::str::from_utf8(&payload[2..]).is_err() {
                                return Err(WireError::InvalidUtf8);
                            }
                            if !valid_close_code(code) {
                                return Err(WireError::Protocol("invalid close code"));
                            }
                            Ok(Some(Inbound::Close(Some(code))))
                        }
                    };
                }
                _ => return Err(WireError::Protocol("reserved opcode")),
            }
        }
    }

    fn decode_line(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        loop {
            let Some(pos) = src[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = src.len();
                if src.len() > self.max_message {
                    return Err(WireError::TooBig(self.max_message));
                }
                return Ok(None);
            };
            let pos = self.scanned + pos;
            self.scanned = 0;
            if pos > self.max_message {
                return Err(WireError::TooBig(self.max_message));
            }
            let mut line = src.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            if line.is_empty() {
                continue;
            }
            return Ok(Some(classify(line.freeze())));
        }
    }

    fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, WireError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_message {
            return Err(WireError::TooBig(self.max_message));
        }
        if src.len() < 4 + len {
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(classify(src.split_to(len).freeze())))
    }
}

/// A parsed WebSocket frame header.
#[derive(Debug)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: u64,
    header_len: usize,
}

fn ws_header(src: &[u8]) -> Result<Option<Header>, WireError> {
    if src.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (src[0], src[1]);
    if b0 & 0x70 != 0 {
        return Err(WireError::Protocol(
            "reserved bits set (no extension was agreed)",
        ));
    }
    if b1 & 0x80 == 0 {
        return Err(WireError::Protocol("client frame not masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => {
            if src.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([src[2], src[3]])), 4)
        }
        127 => {
            if src.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&src[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(WireError::Protocol("frame length has its top bit set"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if src.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&src[at..at + 4]);
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        len,
        header_len: at + 4,
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

fn finish(binary: bool, data: Bytes) -> Result<Inbound, WireError> {
    if binary {
        Ok(Inbound::Binary(data))
    } else if std::str::from_utf8(&data).is_ok() {
        Ok(Inbound::Text(data))
    } else {
        Err(WireError::InvalidUtf8)
    }
}

/// Close codes a peer may send (RFC 6455 §7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Text if it is UTF-8, binary otherwise (the TCP protocols carry bytes).
fn classify(b: Bytes) -> Inbound {
    if std::str::from_utf8(&b).is_ok() {
        Inbound::Text(b)
    } else {
        Inbound::Binary(b)
    }
}

/// One unmasked server frame.
fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= u16::MAX as usize => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// The bytes of one message on `wire`. Text payloads must be UTF-8 (the
/// caller checked once per fan-out).
pub(crate) fn encode_message(wire: Wire, data: &[u8], binary: bool) -> Bytes {
    match wire {
        Wire::Ws => ws_frame(if binary { OP_BINARY } else { OP_TEXT }, data),
        Wire::Text => {
            let mut out = BytesMut::with_capacity(data.len() + 1);
            out.put_slice(data);
            out.put_u8(b'\n');
            out.freeze()
        }
        Wire::Frame => {
            let mut out = BytesMut::with_capacity(data.len() + 4);
            out.put_u32(data.len() as u32);
            out.put_slice(data);
            out.freeze()
        }
    }
}

/// A WebSocket ping (empty), or on the TCP protocols the configured ping
/// data as an ordinary message (the only kind they have).
pub(crate) fn encode_ping(wire: Wire, data: Option<&[u8]>) -> Option<Bytes> {
    match (wire, data) {
        (Wire::Ws, Some(d)) => Some(encode_message(wire, d, std::str::from_utf8(d).is_err())),
        (Wire::Ws, None) => Some(Bytes::from_static(&[0x80 | OP_PING, 0])),
        (_, Some(d)) => Some(encode_message(wire, d, true)),
        (_, None) => None,
    }
}

pub(crate) fn encode_pong(data: &[u8]) -> Bytes {
    ws_frame(OP_PONG, data)
}

/// A WebSocket close frame; the reason is cut to fit a control frame.
pub(crate) fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut body = Vec::with_capacity(2 + cut);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&reason.as_bytes()[..cut]);
    ws_frame(OP_CLOSE, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_are_the_frames_each_wire_expects() {
        // The data-less WebSocket ping is a static frame; it must be the
        // one the generic encoder would build.
        assert_eq!(encode_ping(Wire::Ws, None).unwrap(), ws_frame(OP_PING, &[]));
        assert_eq!(
            encode_ping(Wire::Ws, Some(b"{\"type\":\"ping\"}")).unwrap(),
            encode_message(Wire::Ws, b"{\"type\":\"ping\"}", false)
        );
        assert!(encode_ping(Wire::Text, None).is_none());
        assert_eq!(
            encode_ping(Wire::Text, Some(b"ping")).unwrap(),
            encode_message(Wire::Text, b"ping", true)
        );
    }

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<Inbound>, WireError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = d.decode(&mut buf)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn ws_messages_of_every_length_class_byte_by_byte() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let frame = client_frame(true, OP_TEXT, &payload);
            let mut d = Decoder::new(Wire::Ws, 1 << 20);
            let mut buf = BytesMut::new();
            let mut got = None;
            // Fed in uneven pieces: the decoder must wait, never misparse.
            for piece in frame.chunks(7919) {
                buf.extend_from_slice(piece);
                if let Some(m) = d.decode(&mut buf).unwrap() {
                    got = Some(m);
                }
            }
            assert_eq!(got, Some(Inbound::Text(payload.into())), "len {len}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn ws_fragments_and_interleaved_control_frames() {
        let mut bytes = client_frame(false, OP_BINARY, b"he");
        bytes.extend(client_frame(true, OP_PING, b"p"));
        bytes.extend(client_frame(false, OP_CONTINUATION, b"ll"));
        bytes.extend(client_frame(true, OP_CONTINUATION, &[0xff]));
        bytes.extend(client_frame(true, OP_PONG, b""));
        bytes.extend(client_frame(true, OP_CLOSE, &[0x03, 0xe8, b'o', b'k']));
        let mut d = Decoder::new(Wire::Ws, 100);
        assert_eq!(
            decode_all(&mut d, &bytes).unwrap(),
            vec![
                Inbound::Ping(Bytes::from_static(b"p")),
                Inbound::Binary(Bytes::from_static(b"hell\xff")),
                Inbound::Pong,
                Inbound::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn ws_violations_have_precise_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // Unmasked client frame.
            (vec![0x81, 0x01, b'a'], 1002),
            // Reserved bit (no extension agreed).
            (
                {
                    let mut f = client_frame(true, OP_TEXT, b"a");
                    f[0] |= 0x40;
                    f
                },
                1002,
            ),
            (client_frame(true, 0x3, b""), 1002),
            (client_frame(true, OP_CONTINUATION, b"a"), 1002),
            (client_frame(false, OP_PING, b""), 1002),
            (client_frame(true, OP_PING, &[0; 126]), 1002),
            (client_frame(true, OP_TEXT, &[0xc3, 0x28]), 1007),
            (client_frame(true, OP_CLOSE, &[0x03]), 1002),
            (client_frame(true, OP_CLOSE, &[0x03, 0xed]), 1002),
            (
                {
                    let mut f = client_frame(false, OP_TEXT, b"a");
                    f.extend(client_frame(true, OP_TEXT, b"b"));
                    f
                },
                1002,
            ),
        ];
        for (bytes, code) in cases {
            let mut d = Decoder::new(Wire::Ws, 100);
            let err = decode_all(&mut d, &bytes).unwrap_err();
            assert_eq!(err.close_code(), code, "{bytes:02x?}: {err}");
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_the_payload_arrives() {
        // Only the header of a 1 GiB frame: refused at once.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        let mut d = Decoder::new(Wire::Ws, 1024);
        assert_eq!(decode_all(&mut d, &header), Err(WireError::TooBig(1024)));
        // Fragments adding up past the limit.
        let mut f = client_frame(false, OP_TEXT, &[b'a'; 600]);
        f.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 600]));
        let mut d = Decoder::new(Wire::Ws, 1024);
        assert_eq!(decode_all(&mut d, &f), Err(WireError::TooBig(1024)));
        // Length-prefixed frames.
        let mut d = Decoder::new(Wire::Frame, 1024);
        assert_eq!(
            decode_all(&mut d, &[0, 0, 4, 1]),
            Err(WireError::TooBig(1024))
        );
        // A line without its newline yet.
        let mut d = Decoder::new(Wire::Text, 8);
        assert_eq!(decode_all(&mut d, b"123456789"), Err(WireError::TooBig(8)));
    }

    #[test]
    fn text_lines_and_length_prefixed_frames() {
        let mut d = Decoder::new(Wire::Text, 64);
        let mut buf = BytesMut::from(&b"one\r\n\ntw"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::Text("one".into()))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"o\n\xff\n");
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::Text("two".into()))
        );
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::Binary(Bytes::from_static(b"\xff")))
        );
        let mut d = Decoder::new(Wire::Frame, 64);
        let mut buf = BytesMut::from(&b"\0\0\0\x02hi\0\0\0"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Inbound::Text("hi".into()))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert_eq!(d.wanted(&buf), None);
        buf.extend_from_slice(b"\x03ab");
        assert_eq!(d.wanted(&buf), Some(1));
    }

    #[test]
    fn encoded_frames_round_trip_through_a_client_view() {
        for len in [0usize, 125, 126, 65536] {
            let data = vec![7u8; len];
            let f = encode_message(Wire::Ws, &data, true);
            let (hdr, body) = match len {
                n if n < 126 => (2, &f[2..]),
                n if n <= 65535 => (4, &f[4..]),
                _ => (10, &f[10..]),
            };
            assert_eq!(f[0], 0x82);
            assert_eq!(f.len(), hdr + len);
            assert_eq!(body, &data[..]);
        }
        assert_eq!(&encode_message(Wire::Text, b"x", false)[..], b"x\n");
        assert_eq!(
            &encode_message(Wire::Frame, b"x", false)[..],
            b"\0\0\0\x01x"
        );
        let close = encode_close(4500, &"é".repeat(100));
        assert!(close.len() <= 127);
        assert!(std::str::from_utf8(&close[4..]).is_ok());
    }
}
