//! Generated protobuf and gRPC code (`seqd.v1`), and the conversions
//! between it and domain types.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("seqd.v1");

/// Records of the Raft log and the state machine.
pub mod state {
    tonic::include_proto!("seqd.v1.state");
}

/// Encoded file descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("seqd_descriptor");
