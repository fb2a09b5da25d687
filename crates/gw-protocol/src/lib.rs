//! The wire protocol of gateworker, without any I/O.
//!
//! * [`frame`]: the link framing (big-endian `u32` length + one protobuf
//!   [`pb::LinkFrame`]), with the size cap checked before allocating.
//! * [`pb`]: the generated protobuf types of `proto/gateworker/link/v1/link.proto`.
//! * [`ClientId`] / [`GatewayId`]: the cluster-unique, routable client id.
//! * [`domain`]: validated domain types ([`Event`], [`Command`], [`Query`])
//!   bridged to the generated types by checking conversions.
//! * [`auth`]: the challenge-response proofs of the cluster secret.
//! * [`codes`]: the numeric error and close codes, in documented ranges.
//!
//! Nothing here depends on an async runtime, so all of it is tested and
//! fuzzed without sockets.
#![forbid(unsafe_code)]

pub mod auth;
mod client_id;
pub mod codes;
pub mod domain;
pub mod frame;

pub use client_id::{ClientId, ClientIdText, GatewayId, ParseIdError};
pub use domain::{
    Command, ConversionError, Event, EventKind, HandshakeRequest, Payload, Query, Scope,
};

/// Generated protobuf types (`gateworker.link.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/gateworker.link.v1.rs"));
}

/// Version of the link protocol, exchanged in the handshake. Peers with a
/// different version are refused with [`codes::LINK_VERSION_MISMATCH`].
pub const PROTOCOL_VERSION: u32 = 1;
