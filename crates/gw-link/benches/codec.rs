//! The link codec on the two frames of the data path: a client's message
//! going to a worker (an `Event`) and a worker's group send coming back (a
//! `Command`), one at a time and 64 to a buffer.
//!
//!     cargo bench -p gw-link --bench codec -- --quick

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gw_link::{frame, LinkCodec, DEFAULT_MAX_FRAME};
use gw_protocol::pb::{self, link_frame::Body, LinkFrame};
use gw_protocol::{ClientId, Command, Event, EventKind, Payload};
use tokio_util::codec::{Decoder, Encoder};

/// Frames per buffer in the batch case.
const BATCH: usize = 64;

/// A 64-byte text message, as a chat client would send.
fn payload() -> Payload {
    let text = r#"{"type":"say","room":"room","text":"hello, everyone in here!!!"}"#;
    assert_eq!(text.len(), 64);
    Payload::text(text)
}

/// A client message on its way to a worker, built as the gateway builds it.
fn event_frame() -> LinkFrame {
    let client_id: ClientId = "0123456789ab00000001".parse().expect("a valid client id");
    let event = Event {
        id: 1,
        client_id,
        session: Bytes::new(),
        remote_addr: "127.0.0.1:50000".to_string(),
        redelivered: false,
        kind: EventKind::Message(payload()),
    };
    frame(Body::Event(event.into()))
}

/// A worker's send to one group, built as the worker SDK builds it.
fn command_frame() -> LinkFrame {
    let cmd: pb::Command = Command::SendToGroups {
        groups: vec!["room".to_string()],
        payload: payload(),
        exclude: Vec::new(),
    }
    .into();
    frame(Body::Command(cmd))
}

fn codec() -> LinkCodec {
    LinkCodec {
        max_frame: DEFAULT_MAX_FRAME,
    }
}

fn encoded(f: &LinkFrame) -> Bytes {
    let mut buf = BytesMut::new();
    codec().encode(f.clone(), &mut buf).expect("encodes");
    buf.freeze()
}

fn bench_codec(c: &mut Criterion) {
    for (name, f) in [("event", event_frame()), ("command", command_frame())] {
        let wire = encoded(&f);
        let mut g = c.benchmark_group(format!("link_codec/{name}"));

        g.throughput(Throughput::Elements(1));
        // The frame is cloned outside the timing: `encode` consumes it.
        let mut buf = BytesMut::with_capacity(4096);
        g.bench_function("encode", |b| {
            b.iter_batched(
                || f.clone(),
                |f| {
                    buf.clear();
                    codec().encode(f, &mut buf).expect("encodes");
                    black_box(buf.len())
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function("decode", |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut src| codec().decode(&mut src).expect("decodes"),
                BatchSize::SmallInput,
            )
        });

        g.throughput(Throughput::Elements(BATCH as u64));
        let mut buf = BytesMut::with_capacity(BATCH * (wire.len() + 64));
        g.bench_function(format!("encode_decode_batch{BATCH}"), |b| {
            b.iter_batched(
                || vec![f.clone(); BATCH],
                |frames| {
                    buf.clear();
                    let mut codec = codec();
                    for f in frames {
                        codec.encode(f, &mut buf).expect("encodes");
                    }
                    let mut n = 0;
                    while let Some(f) = codec.decode(&mut buf).expect("decodes") {
                        black_box(f);
                        n += 1;
                    }
                    assert_eq!(n, BATCH);
                },
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
