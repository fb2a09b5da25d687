//! Numeric codes that cross the wire, in documented ranges (see
//! `docs/protocol.md`).
//!
//! * 1000–1999: link errors ([`crate::pb::LinkError`], [`crate::pb::Notice`]).
//! * 4000–4499: WebSocket close codes after which a client should reconnect.
//! * 4500–4999: WebSocket close codes after which it should not.

/// The peer's proof of the cluster secret was wrong.
pub const LINK_AUTH_FAILED: u32 = 1001;
/// The peer speaks another protocol version.
pub const LINK_VERSION_MISMATCH: u32 = 1002;
/// A frame was larger than the receiver's limit.
pub const LINK_FRAME_TOO_LARGE: u32 = 1003;
/// A frame could not be decoded, or failed validation.
pub const LINK_MALFORMED: u32 = 1004;
/// A frame was valid but not allowed at this point (e.g. a command before the handshake).
pub const LINK_UNEXPECTED: u32 = 1005;
/// The handshake did not finish in time.
pub const LINK_HANDSHAKE_TIMEOUT: u32 = 1006;
/// A gateway announced an id another live gateway already has.
pub const LINK_DUPLICATE_GATEWAY: u32 = 1007;
/// The peer stopped answering pings.
pub const LINK_HEARTBEAT_TIMEOUT: u32 = 1008;

/// A command named a client or argument that is invalid (the link stays up).
pub const NOTICE_BAD_COMMAND: u32 = 1100;
/// A query was refused (the link stays up).
pub const NOTICE_BAD_QUERY: u32 = 1101;

/// WebSocket close: the gateway is shutting down; reconnect (to another gateway).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// WebSocket close: a message exceeded the listener's size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close: the client's outgoing queue overflowed (it reads too slowly).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close: the client sent nothing for too many ping intervals.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4009;
/// Close: an application (worker) closed the client on purpose.
pub const CLOSE_BY_APPLICATION: u16 = 4500;
