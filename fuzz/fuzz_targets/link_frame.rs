//! Arbitrary bytes into the link frame decoder and the domain conversions:
//! no panic, no allocation beyond the cap.
#![no_main]

use bytes::BytesMut;
use gw_protocol::frame;
use gw_protocol::pb::link_frame::Body;
use gw_protocol::{Command, Event, Query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut src = BytesMut::from(data);
    while let Ok(Some(f)) = frame::decode(&mut src, 1 << 20) {
        match f.body {
            Some(Body::Command(c)) => {
                let _ = Command::try_from(c);
            }
            Some(Body::Event(e)) => {
                let _ = Event::try_from(e);
            }
            Some(Body::Query(q)) => {
                let _ = Query::try_from(q);
            }
            _ => {}
        }
    }
});
