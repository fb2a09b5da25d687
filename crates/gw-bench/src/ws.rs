//! The generator's own WebSocket client (RFC 6455, client side).
//!
//! tokio-tungstenite cost the one-thread generator about as much CPU per
//! delivery as the gateway spent producing it: a message allocation per
//! frame, a read attempt that ends in `WouldBlock` after every frame and
//! a waker proxy per poll. Here a connection is a socket plus two byte
//! buffers: one read fetches every frame the kernel holds, frames are
//! parsed in place and handed out as `&str` without a copy, and a window
//! of outgoing frames is masked into one buffer and written with one call.
//!
//! Framing is sans-IO ([`parse_frame`], [`encode_text`]) with unit tests;
//! [`Ws`] only moves bytes. It checks what a client must: the upgrade
//! answer (101 and the right `Sec-WebSocket-Accept`), unmasked server
//! frames, UTF-8 text, control-frame rules, and answers pings.

use std::ops::Range;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::client::splitmix64;

/// Largest frame accepted from a server (a chat delivery is < 1 KiB).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest upgrade response accepted.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// One complete frame at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    /// Payload position in the buffer; `payload.end` is the frame's length.
    pub payload: Range<usize>,
}

/// Parse the frame at the start of `buf`; `Ok(None)` = incomplete.
pub fn parse_frame(buf: &[u8]) -> Result<Option<RawFrame>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        bail!("server frame with reserved bits set (no extension was negotiated)");
    }
    if b1 & 0x80 != 0 {
        bail!("masked frame from the server (RFC 6455 5.1: servers must not mask)");
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let (len, head) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || len > 125 {
                bail!("fragmented or oversized control frame from the server");
            }
        }
        other => bail!("unknown opcode {other:#x} from the server"),
    }
    if len > MAX_FRAME as u64 {
        bail!("server frame of {len} bytes exceeds {MAX_FRAME}");
    }
    let total = head + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(RawFrame {
        fin,
        opcode,
        payload: head..total,
    }))
}

/// Append one masked client frame (`opcode`, FIN set) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Append one masked text frame to `out`.
pub fn encode_text(out: &mut Vec<u8>, text: &str, mask: [u8; 4]) {
    encode_frame(out, OP_TEXT, text.as_bytes(), mask);
}

/// What the next complete message is.
#[derive(Debug)]
pub enum Next<'a> {
    /// A text message (checked to be UTF-8), borrowed from the connection.
    Text(&'a str),
    /// The server closed (code, reason).
    Closed(Option<u16>, String),
    /// A binary message (the chat protocol has none).
    Binary,
}

/// A client connection: socket, read buffer, pending writes.
pub struct Ws {
    tcp: TcpStream,
    rbuf: Vec<u8>,
    /// Start of unparsed bytes in `rbuf`.
    rpos: usize,
    /// Bytes fetched per read (and the capacity kept when idle).
    read_chunk: usize,
    wbuf: Vec<u8>,
    write_keep: usize,
    /// A fragmented message being put together, and its kind; the last
    /// one completed stays here until the next call.
    frag: Option<(u8, Vec<u8>)>,
    assembled: Vec<u8>,
    mask_state: u64,
}

impl Ws {
    /// Do the opening handshake on a connected socket.
    pub async fn handshake(
        mut tcp: TcpStream,
        host: &str,
        path: &str,
        read_chunk: usize,
        write_keep: usize,
        seed: u64,
    ) -> Result<Ws> {
        let mut state = seed ^ 0x5DEE_CE66_D1CE_4E5B;
        let mut key_bytes = [0u8; 16];
        key_bytes[..8].copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        key_bytes[8..].copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(req.as_bytes())
            .await
            .context("send upgrade request")?;
        let mut buf = Vec::with_capacity(1024);
        let head_end = loop {
            if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_RESPONSE_HEAD {
                bail!("upgrade response head larger than {MAX_RESPONSE_HEAD} bytes");
            }
            buf.reserve(1024);
            if tcp
                .read_buf(&mut buf)
                .await
                .context("read upgrade response")?
                == 0
            {
                bail!("server closed the connection during the handshake");
            }
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .map_err(|_| anyhow!("upgrade response head is not UTF-8"))?;
        check_upgrade_response(head, &key)?;
        Ok(Ws {
            tcp,
            // What followed the head is the first frames; read_more
            // reclaims the head's bytes.
            rbuf: buf,
            rpos: head_end,
            read_chunk: read_chunk.max(256),
            wbuf: Vec::new(),
            write_keep,
            frag: None,
            assembled: Vec::new(),
            mask_state: state,
        })
    }

    /// Masking keys from a PRNG seeded per connection: RFC 6455 asks for
    /// unpredictable keys to protect intermediaries from crafted bytes; a
    /// loopback load generator has none, and its payloads are its own.
    fn next_mask(&mut self) -> [u8; 4] {
        (splitmix64(&mut self.mask_state) as u32).to_ne_bytes()
    }

    /// Queue a text frame; nothing is written until [`Ws::flush`].
    pub fn feed_text(&mut self, text: &str) {
        let mask = self.next_mask();
        encode_text(&mut self.wbuf, text, mask);
    }

    /// Write everything queued with as few syscalls as the socket allows.
    pub async fn flush(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.tcp
            .write_all(&self.wbuf)
            .await
            .context("websocket write")?;
        self.wbuf.clear();
        if self.wbuf.capacity() > self.write_keep.max(256) * 4 {
            self.wbuf = Vec::new();
        }
        Ok(())
    }

    /// Read whatever the socket has (at least one byte). Cancel-safe: a
    /// cancelled read has read nothing.
    pub async fn read_more(&mut self) -> Result<()> {
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
            if self.rbuf.capacity() > self.read_chunk * 4 {
                self.rbuf = Vec::new();
            }
        } else if self.rpos > 0 && self.rbuf.capacity() - self.rbuf.len() < self.read_chunk {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        self.rbuf.reserve(self.read_chunk);
        let n = self
            .tcp
            .read_buf(&mut self.rbuf)
            .await
            .context("websocket read")?;
        if n == 0 {
            bail!("server closed the connection (EOF without a close frame)");
        }
        Ok(())
    }

    /// The next complete message already read, if any. Pings are answered
    /// (on the next flush) and pongs skipped on the way.
    pub fn next_message(&mut self) -> Result<Option<Next<'_>>> {
        loop {
            let Some(f) = parse_frame(&self.rbuf[self.rpos..])? else {
                return Ok(None);
            };
            let payload = self.rpos + f.payload.start..self.rpos + f.payload.end;
            // The frame is consumed here; its bytes stay in `rbuf` until
            // the next read_more.
            self.rpos += f.payload.end;
            match f.opcode {
                OP_PING => {
                    let mask = self.next_mask();
                    encode_frame(&mut self.wbuf, OP_PONG, &self.rbuf[payload], mask);
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let p = &self.rbuf[payload];
                    let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into();
                    return Ok(Some(Next::Closed(code, reason)));
                }
                OP_TEXT | OP_BINARY => {
                    if self.frag.is_some() {
                        bail!("new data frame inside a fragmented message");
                    }
                    if !f.fin {
                        self.frag = Some((f.opcode, self.rbuf[payload].to_vec()));
                    } else if f.opcode == OP_BINARY {
                        return Ok(Some(Next::Binary));
                    } else {
                        let text = std::str::from_utf8(&self.rbuf[payload])
                            .map_err(|_| anyhow!("text frame is not valid UTF-8"))?;
                        return Ok(Some(Next::Text(text)));
                    }
                }
                _ => {
                    // Continuation.
                    let Some((kind, mut data)) = self.frag.take() else {
                        bail!("continuation frame without a message to continue");
                    };
                    data.extend_from_slice(&self.rbuf[payload]);
                    if data.len() > MAX_FRAME {
                        bail!("fragmented message exceeds {MAX_FRAME} bytes");
                    }
                    if !f.fin {
                        self.frag = Some((kind, data));
                    } else if kind == OP_BINARY {
                        return Ok(Some(Next::Binary));
                    } else {
                        self.assembled = data;
                        let text = std::str::from_utf8(&self.assembled)
                            .map_err(|_| anyhow!("text message is not valid UTF-8"))?;
                        return Ok(Some(Next::Text(text)));
                    }
                }
            }
        }
    }

    /// Next text message, reading as needed; a close, binary message or
    /// EOF is an error.
    pub async fn next_text(&mut self) -> Result<String> {
        loop {
            match self.next_message()? {
                Some(Next::Text(t)) => return Ok(t.to_owned()),
                Some(Next::Closed(code, reason)) => {
                    bail!("server closed the connection: code {code:?} {reason:?}")
                }
                Some(Next::Binary) => bail!("unexpected binary frame"),
                None => {
                    self.flush().await?;
                    self.read_more().await?;
                }
            }
        }
    }

    /// Send a close frame (1000) with whatever is queued.
    pub async fn close(&mut self) -> Result<()> {
        let mask = self.next_mask();
        encode_frame(&mut self.wbuf, OP_CLOSE, &1000u16.to_be_bytes(), mask);
        self.flush().await
    }
}

/// Check a `101 Switching Protocols` answer to our key.
fn check_upgrade_response(head: &str, key: &str) -> Result<()> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "101" {
        bail!("websocket handshake refused: {status:?}");
    }
    let expected = derive_accept_key(key.as_bytes());
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim());
    match accept {
        Some(a) if a == expected => Ok(()),
        Some(a) => bail!("wrong Sec-WebSocket-Accept {a:?} (expected {expected:?})"),
        None => bail!("upgrade response without Sec-WebSocket-Accept"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked (server) frame.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 0xFFFF {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn server_frames_of_every_length_form_parse_and_partial_ones_wait() {
        for n in [0usize, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload = vec![b'x'; n];
            let f = server_frame(true, OP_TEXT, &payload);
            let parsed = parse_frame(&f).unwrap().unwrap();
            assert_eq!(parsed.payload.end, f.len(), "length {n}");
            assert_eq!(&f[parsed.payload.clone()], &payload[..]);
            assert!(parsed.fin);
            assert_eq!(parsed.opcode, OP_TEXT);
            for cut in [0, 1, f.len() / 2, f.len() - 1] {
                if cut < f.len() {
                    assert_eq!(parse_frame(&f[..cut]).unwrap(), None, "{n} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn protocol_violations_from_the_server_are_errors() {
        let mut masked = server_frame(true, OP_TEXT, b"hi");
        masked[1] |= 0x80;
        assert!(parse_frame(&masked)
            .unwrap_err()
            .to_string()
            .contains("mask"));
        let mut rsv = server_frame(true, OP_TEXT, b"hi");
        rsv[0] |= 0x40;
        assert!(parse_frame(&rsv).is_err());
        assert!(parse_frame(&server_frame(true, 0x3, b"")).is_err());
        assert!(parse_frame(&server_frame(false, OP_PING, b"")).is_err());
        assert!(parse_frame(&server_frame(true, OP_PING, &[0; 126])).is_err());
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        assert!(parse_frame(&huge).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_text() {
        for n in [0usize, 3, 125, 126, 300, 70000] {
            let text: String = (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let mask = [0x12, 0x34, 0x56, 0x78];
            let mut out = Vec::new();
            encode_text(&mut out, &text, mask);
            assert_eq!(out[0], 0x81);
            assert_ne!(out[1] & 0x80, 0, "mask bit");
            let (len, head) = match out[1] & 0x7F {
                126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                l => (l as usize, 2),
            };
            assert_eq!(len, n);
            assert_eq!(&out[head..head + 4], &mask);
            let body: Vec<u8> = out[head + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(body, text.as_bytes());
            if n > 0 {
                assert_ne!(&out[head + 4..], text.as_bytes(), "payload is masked");
            }
        }
    }

    #[test]
    fn upgrade_response_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        check_upgrade_response(ok, key).unwrap();
        let wrong = ok.replace("s3pP", "AAAA");
        assert!(check_upgrade_response(&wrong, key).is_err());
        let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert!(check_upgrade_response(refused, key)
            .unwrap_err()
            .to_string()
            .contains("401"));
    }

    /// Frames through a real socket pair: several frames per read,
    /// fragmentation, a ping answered, a close reported.
    #[tokio::test]
    async fn messages_come_out_whole_and_pings_are_answered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while memchr::memmem::find(&head, b"\r\n\r\n").is_none() {
                s.read_buf(&mut head).await.unwrap();
            }
            let head = String::from_utf8(head).unwrap();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_string();
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
            .into_bytes();
            // Frames right behind the response head, in one write.
            out.extend(server_frame(true, OP_TEXT, b"one"));
            out.extend(server_frame(true, OP_PING, b"p"));
            out.extend(server_frame(false, OP_TEXT, "tw".as_bytes()));
            out.extend(server_frame(true, OP_PONG, b""));
            out.extend(server_frame(true, OP_CONT, "o\u{e9}".as_bytes()));
            out.extend(server_frame(true, OP_TEXT, b"three"));
            let mut close = 1001u16.to_be_bytes().to_vec();
            close.extend_from_slice(b"bye");
            out.extend(server_frame(true, OP_CLOSE, &close));
            s.write_all(&out).await.unwrap();
            // Expect the pong (masked "p").
            let mut got = vec![0u8; 7];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], 0x8A);
            assert_eq!(got[1], 0x81);
            assert_eq!(got[6] ^ got[2], b'p');
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut ws = Ws::handshake(tcp, &addr.to_string(), "/", 4096, 4096, 7)
            .await
            .unwrap();
        assert_eq!(ws.next_text().await.unwrap(), "one");
        assert_eq!(ws.next_text().await.unwrap(), "two\u{e9}");
        assert_eq!(ws.next_text().await.unwrap(), "three");
        ws.flush().await.unwrap();
        let err = ws.next_text().await.unwrap_err().to_string();
        assert!(err.contains("1001") && err.contains("bye"), "{err}");
        server.await.unwrap();
    }
}
