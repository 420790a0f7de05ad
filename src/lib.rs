//! seqd: a Raft-replicated sequence allocator for instant-messaging backends.
//!
//! Frontends ask for per-key sequence numbers over gRPC; a Raft group of
//! nodes hands them out from ceilings it has committed, so numbers never
//! repeat and never go backwards across crashes, restarts and leader changes.
//!
//! # Layout
//!
//! - [`core`]: the allocator, pure logic (segments, ceilings, leader state).
//! - [`storage`]: RocksDB: the Raft log ([`storage::RaftStore`]) and the
//!   replicated state machine ([`storage::Machine`]).
//! - [`raft`]: the node loop that owns raft-rs's `RawNode`, the peer
//!   transport, and the mailbox the gRPC layer talks to.
//! - [`service`]: gRPC handlers and the one mapping from errors to
//!   `tonic::Status`.
//! - [`client`]: the Rust client (leader discovery, retries).
//! - [`config`]: typed configuration, files + flags + `SEQD_*` variables.
//! - [`metrics`]: every metric name, and the Prometheus exporter.
//! - [`server`]: wiring and ordered shutdown.
//!
//! Everything but [`client`] and [`pb`] is behind the default `server`
//! feature; without it the crate is a client library that builds no RocksDB.

pub mod client;
pub mod codec;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod core;
#[cfg(feature = "server")]
pub mod metrics;
pub mod pb;
#[cfg(feature = "server")]
pub mod raft;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod sim;
#[cfg(feature = "server")]
pub mod storage;
#[cfg(feature = "server")]
pub mod telemetry;
