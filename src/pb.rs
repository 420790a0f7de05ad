//! Generated protobuf and gRPC code (`seqd.v1`), and the conversions
//! between it and domain types.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("seqd.v1");

/// `seqd.v1.NextStreamRequest` with its batch left encoded (build.rs maps
/// the message here). prost would decode the batch into a `String` per key
/// (an allocation, a copy and a free each, most of a 100-key batch's
/// decode), only for the node to copy each key again; the node reads the
/// bytes itself (`service::sequencer::read_batch`), and the client encodes
/// a batch once for all its attempts. Wire-compatible with the message:
/// the batch is a length-delimited field either way; `optional`, so that
/// an empty batch is still sent as one.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NextStreamRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// An encoded `NextBatchRequest`.
    #[prost(bytes = "bytes", optional, tag = "2")]
    pub batch: ::core::option::Option<::prost::bytes::Bytes>,
    #[prost(bool, tag = "3")]
    pub packed_ranges: bool,
}

/// Records of the Raft log and the state machine.
pub mod state {
    tonic::include_proto!("seqd.v1.state");
}

/// Encoded file descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("seqd_descriptor");
