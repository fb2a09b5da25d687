//! The gateway's fan-out path without sockets: one worker `SendToGroups`
//! of a 64-byte text message to a group of N WebSocket clients (encoded
//! once, pushed to N queues), then every queue taken as the clients' writer
//! tasks take them. Throughput is in deliveries (queued frames) per second.
//!
//!     cargo bench -p gw-gateway --bench fanout -- --quick

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gw_gateway::bench_support::FanoutFixture;
use gw_protocol::Payload;

/// Group sizes.
const MEMBERS: [usize; 4] = [10, 100, 1_000, 10_000];

fn bench_fanout(c: &mut Criterion) {
    let text = r#"{"type":"say","room":"room","text":"hello, everyone in here!!!"}"#;
    assert_eq!(text.len(), 64);
    let payload = Payload::text(text);
    let mut g = c.benchmark_group("fanout/send_to_group");
    for members in MEMBERS {
        let mut fixture = FanoutFixture::new(members);
        assert_eq!(fixture.send(&payload), members);
        assert_eq!(fixture.drain(), members);
        g.throughput(Throughput::Elements(members as u64));
        g.bench_with_input(BenchmarkId::from_parameter(members), &members, |b, _| {
            b.iter(|| {
                black_box(fixture.send(&payload));
                black_box(fixture.drain())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_fanout);
criterion_main!(benches);
