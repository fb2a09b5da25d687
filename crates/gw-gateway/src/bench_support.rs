//! For benches only (`benches/fanout.rs`): not part of the gateway's API,
//! hidden from its docs and free to change with the hub.
//!
//! A [`FanoutFixture`] is the hub of one gateway with N clients in one group
//! and no sockets: [`FanoutFixture::send`] runs a worker's `SendToGroups` as
//! a link would, [`FanoutFixture::drain`] empties every client's queue as
//! the clients' writer tasks would.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use gw_protocol::{ClientId, Command, GatewayId, Payload};

use crate::client::wire::Wire;
use crate::hub::{ClientSender, ClientShared, Hub, QueueLimits};
use crate::metrics::Metrics;

/// The group every fixture client is in.
const GROUP: &str = "room";

/// A hub with `members` WebSocket clients, all in group `"room"`.
pub struct FanoutFixture {
    /// The tables a send runs against.
    hub: Hub,
    /// Every member's queue, in the order they joined.
    members: Vec<ClientSender>,
    /// Reused by [`Self::drain`] the way a connection reuses its write
    /// queue, so draining does not free and reallocate queues.
    scratch: VecDeque<Bytes>,
}

impl FanoutFixture {
    /// Registers `members` ready clients (queues large enough never to fill
    /// between two drains) and joins each to the group.
    pub fn new(members: usize) -> Self {
        let gateway_id = GatewayId::new(0x0123_4567_89ab).expect("a valid gateway id");
        let hub = Hub::new(gateway_id, Arc::new(Metrics::default()));
        let limits = QueueLimits {
            messages: 1 << 20,
            bytes: 1 << 30,
        };
        let members: Vec<ClientSender> = (0..members)
            .map(|_| {
                let sender = ClientShared::new(Wire::Ws, limits);
                let client_id: ClientId = hub.add_client(sender.clone());
                hub.execute(Command::JoinGroup {
                    client_id,
                    group: GROUP.to_string(),
                })
                .expect("joining a local client to a group");
                sender
            })
            .collect();
        FanoutFixture {
            hub,
            members,
            scratch: VecDeque::new(),
        }
    }

    /// Sends `payload` to the group; returns how many queues it reached.
    pub fn send(&self, payload: &Payload) -> usize {
        self.hub
            .execute(Command::SendToGroups {
                groups: vec![GROUP.to_string()],
                payload: payload.clone(),
                exclude: Vec::new(),
            })
            .expect("a send to a group does not fail")
    }

    /// Empties every member's queue; returns the number of frames taken.
    pub fn drain(&mut self) -> usize {
        let mut frames = 0;
        for m in &self.members {
            frames += m.take(&mut self.scratch).0;
            self.scratch.clear();
        }
        frames
    }
}
