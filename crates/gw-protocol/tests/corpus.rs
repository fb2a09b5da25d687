//! The fuzz corpus in `fuzz/corpus/link_frame/` is fed to the decoder and
//! the domain conversions on every test run (so the seeds that cargo-fuzz
//! starts from are checked in CI too). `GW_WRITE_CORPUS=1` rewrites the
//! seed files from real frames.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use gw_protocol::frame;
use gw_protocol::pb::{self, link_frame::Body, LinkFrame};
use gw_protocol::{ClientId, Command, Event, GatewayId, Payload, Query, Scope};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/link_frame")
}

fn seeds() -> Vec<(&'static str, LinkFrame)> {
    let gw = GatewayId::new(0xabc).unwrap();
    let id = ClientId::new(gw, 7).unwrap();
    let f = |b| LinkFrame { body: Some(b) };
    let ev = Event {
        id: 1,
        client_id: id,
        session: Bytes::from_static(br#"{"k":1}"#),
        remote_addr: "127.0.0.1:5".into(),
        redelivered: false,
        kind: gw_protocol::EventKind::Message(Payload::text("hi")),
    };
    let mut set = serde_json::Map::new();
    set.insert("a".into(), serde_json::json!([1, 2]));
    vec![
        ("ping", f(Body::Ping(pb::Ping { nonce: 9 }))),
        ("event_message", f(Body::Event(ev.into()))),
        (
            "command_send_to_groups",
            f(Body::Command(
                Command::SendToGroups {
                    groups: vec!["room".into(), "0".into()],
                    payload: Payload::binary(vec![0u8, 255]),
                    exclude: vec![id],
                }
                .into(),
            )),
        ),
        (
            "command_update_session",
            f(Body::Command(
                Command::UpdateSession {
                    client_id: id,
                    replace: false,
                    set,
                    remove: vec!["x".into()],
                }
                .into(),
            )),
        ),
        (
            "query_each_group",
            f(Body::Query(Query::new(Scope::EachGroup).into())),
        ),
        (
            "query_uids",
            f(Body::Query(
                Query::new(Scope::Uids(vec!["u".into()])).into(),
            )),
        ),
        ("ack", f(Body::Ack(pb::Ack { ids: vec![1, 2, 3] }))),
        (
            "interest",
            f(Body::Interest(pb::Interest {
                reset: true,
                groups_added: vec!["g".into()],
                version: 3,
                ..Default::default()
            })),
        ),
        (
            "interest_ack",
            f(Body::InterestAck(pb::InterestAck { version: 3 })),
        ),
        (
            "hello",
            f(Body::Hello(pb::Hello {
                role: 2,
                node_id: "w".into(),
                nonce: vec![1; 32].into(),
                proof: vec![2; 32].into(),
                protocol_version: 1,
            })),
        ),
    ]
}

#[test]
fn corpus_decodes_without_panics_and_seeds_round_trip() {
    if std::env::var_os("GW_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, f) in seeds() {
            let mut b = BytesMut::new();
            frame::encode(&f, frame::DEFAULT_MAX_FRAME, &mut b).unwrap();
            std::fs::write(dir().join(name), &b).unwrap();
        }
    }
    let mut n = 0;
    for entry in std::fs::read_dir(dir()).expect("fuzz/corpus/link_frame exists") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let mut src = BytesMut::from(&data[..]);
        while let Ok(Some(f)) = frame::decode(&mut src, frame::DEFAULT_MAX_FRAME) {
            match f.body {
                Some(Body::Command(c)) => assert!(Command::try_from(c).is_ok()),
                Some(Body::Event(e)) => assert!(Event::try_from(e).is_ok()),
                Some(Body::Query(q)) => assert!(Query::try_from(q).is_ok()),
                _ => {}
            }
        }
        n += 1;
    }
    assert!(n >= seeds().len(), "corpus has {n} files");
}
