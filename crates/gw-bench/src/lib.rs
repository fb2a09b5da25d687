//! gw-bench: a loopback-only load generator for gateworker's chat protocol,
//! plus a trivial in-process server implementing the same protocol.
//!
//! The binary is a thin wrapper over [`cli::main`]; the scenario runners and
//! [`serve`] are library functions so integration tests can run them
//! in-process.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod conns;
pub mod load;
pub mod proto;
pub mod report;
pub mod server;
pub mod stats;
pub mod ws;

pub use conns::run_conns;
pub use load::{run_echo, run_fanout, run_whisper};
pub use report::Report;
pub use server::serve;
