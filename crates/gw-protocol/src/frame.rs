//! Link framing: `u32` big-endian length, then one protobuf [`LinkFrame`].
//!
//! Modelled on mini-redis' `Frame::check`: [`decode`] returns `Ok(None)` when
//! the buffer does not hold a whole frame yet ("need more bytes" is not an
//! error), and refuses a declared length above the cap *before* reserving
//! memory for it, so a hostile peer cannot make us allocate 4 GiB.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::pb::{Event, LinkFrame};

/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default cap on one frame's body (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Cap used before the peer has authenticated: a handshake frame is tiny.
pub const HANDSHAKE_MAX_FRAME: usize = 4 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed protobuf frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("empty frame: no message body")]
    Empty,
}

impl FrameError {
    /// The link error code to report to the peer.
    pub fn code(&self) -> u32 {
        match self {
            FrameError::TooLarge { .. } => crate::codes::LINK_FRAME_TOO_LARGE,
            FrameError::Malformed(_) | FrameError::Empty => crate::codes::LINK_MALFORMED,
        }
    }
}

/// Appends `frame` with its length prefix to `dst`.
///
/// Fails only if the encoded frame is larger than `max` (the receiver would
/// refuse it anyway; better to tell the caller).
pub fn encode(frame: &LinkFrame, max: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
    let len = frame.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    frame
        .encode(dst)
        .expect("reserved enough capacity for the frame");
    Ok(())
}

/// `LinkFrame.body`'s field number for `event` (link.proto).
const EVENT_FIELD: u32 = 20;

/// Appends the frame [`encode`] would for a `LinkFrame` whose body is
/// `event`, without building that frame: a gateway keeps each event it
/// sends until the worker acknowledges it, and this spares the move of the
/// event into a frame and back for every one.
pub fn encode_event(event: &Event, max: usize, dst: &mut BytesMut) -> Result<(), FrameError> {
    let len = prost::encoding::message::encoded_len(EVENT_FIELD, event);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    prost::encoding::message::encode(EVENT_FIELD, event, dst);
    Ok(())
}

/// Takes one frame off the front of `src`, if a whole one is there.
pub fn decode(src: &mut BytesMut, max: usize) -> Result<Option<LinkFrame>, FrameError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if src.len() < HEADER_LEN + len {
        // Reserve only what the (already bounded) frame needs.
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    // `freeze` makes the protobuf `bytes` fields slices of this buffer
    // instead of copies.
    let body = src.split_to(len).freeze();
    let frame = LinkFrame::decode(body)?;
    if frame.body.is_none() {
        return Err(FrameError::Empty);
    }
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, link_frame::Body};

    fn ping(n: u64) -> LinkFrame {
        LinkFrame {
            body: Some(Body::Ping(pb::Ping { nonce: n })),
        }
    }

    #[test]
    fn an_event_is_encoded_exactly_as_the_frame_holding_it() {
        let event = pb::Event {
            id: 42,
            client_id: "0123456789ab0000000000000007".into(),
            session: bytes::Bytes::from_static(b"{\"name\":\"ann\"}"),
            remote_addr: "127.0.0.1:5000".into(),
            kind: Some(pb::event::Kind::Message(pb::Message {
                payload: Some(pb::Payload {
                    data: bytes::Bytes::from_static(b"hello"),
                    binary: false,
                }),
            })),
            ..Default::default()
        };
        let whole = LinkFrame {
            body: Some(Body::Event(event.clone())),
        };
        let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
        encode(&whole, DEFAULT_MAX_FRAME, &mut a).unwrap();
        encode_event(&event, DEFAULT_MAX_FRAME, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(decode(&mut b, DEFAULT_MAX_FRAME).unwrap(), Some(whole));
        // The same limit as for any frame.
        let len = a.len() - HEADER_LEN;
        let err = encode_event(&event, len - 1, &mut BytesMut::new()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: l, max } if l == len && max == len - 1));
    }

    #[test]
    fn round_trip_and_partial_input() {
        let mut buf = BytesMut::new();
        encode(&ping(7), DEFAULT_MAX_FRAME, &mut buf).unwrap();
        encode(&ping(8), DEFAULT_MAX_FRAME, &mut buf).unwrap();
        let whole = buf.clone();
        // Feed one byte at a time: never an error, frames come out in order.
        let mut src = BytesMut::new();
        let mut got = Vec::new();
        for b in whole.iter() {
            src.put_u8(*b);
            while let Some(f) = decode(&mut src, DEFAULT_MAX_FRAME).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![ping(7), ping(8)]);
        assert!(src.is_empty());
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        let err = decode(&mut src, DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xffff_ffff,
                ..
            }
        ));
        assert!(src.capacity() < 1024, "reserved {} bytes", src.capacity());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut src = BytesMut::from(&[0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode(&mut src, DEFAULT_MAX_FRAME),
            Err(FrameError::Malformed(_))
        ));
        let mut empty = BytesMut::from(&[0, 0, 0, 0][..]);
        assert!(matches!(
            decode(&mut empty, DEFAULT_MAX_FRAME),
            Err(FrameError::Empty)
        ));
    }

    /// The interest version is a new field: an unversioned frame (an older
    /// gateway's) reads as version 0, and an older reader skips it.
    #[test]
    fn interest_versions_stay_wire_compatible() {
        #[derive(Clone, PartialEq, Message)]
        struct InterestBeforeVersions {
            #[prost(bool, tag = "1")]
            reset: bool,
            #[prost(string, repeated, tag = "2")]
            groups_added: Vec<String>,
        }
        let old = InterestBeforeVersions {
            reset: true,
            groups_added: vec!["g".into()],
        };
        let new = pb::Interest::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!((new.reset, new.version), (true, 0));
        assert_eq!(new.groups_added, ["g"]);
        let versioned = pb::Interest { version: 42, ..new };
        let read_by_old =
            InterestBeforeVersions::decode(versioned.encode_to_vec().as_slice()).unwrap();
        assert_eq!(read_by_old, old);

        let ack = LinkFrame {
            body: Some(Body::InterestAck(pb::InterestAck { version: 42 })),
        };
        let mut buf = BytesMut::new();
        encode(&ack, DEFAULT_MAX_FRAME, &mut buf).unwrap();
        assert_eq!(decode(&mut buf, DEFAULT_MAX_FRAME).unwrap(), Some(ack));
    }

    #[test]
    fn encode_refuses_frames_over_the_cap() {
        let mut buf = BytesMut::new();
        let err = encode(&ping(u64::MAX), 3, &mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(buf.is_empty());
    }
}
