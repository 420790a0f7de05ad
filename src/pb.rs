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
/// an empty batch is still sent as one. One difference: protobuf merges a
/// message field that comes twice (the items of both), where this keeps
/// the last; no encoder writes a field twice. `tests::the_hand_written_messages_match_the_proto`
/// holds the fields to api.proto's.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct NextStreamRequest {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// An encoded `NextBatchRequest`.
    #[prost(bytes = "bytes", optional, tag = "2")]
    pub batch: ::core::option::Option<::prost::bytes::Bytes>,
    /// Asks for the reply's ranges as `NextBatchResponse.firsts` and
    /// `.counts` (see api.proto).
    #[prost(bool, tag = "4")]
    pub packed_ranges: bool,
}

/// Records of the Raft log and the state machine.
pub mod state {
    tonic::include_proto!("seqd.v1.state");
}

/// Encoded file descriptors, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("seqd_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::FileDescriptorSet;

    /// `NextStreamRequest` is written by hand (its batch left encoded):
    /// its fields must be api.proto's, number for number and type for
    /// wire type, or nodes and other clients would not read each other.
    #[test]
    fn the_hand_written_messages_match_the_proto() {
        let set = FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let message = set
            .file
            .iter()
            .filter(|f| f.package() == "seqd.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "NextStreamRequest")
            .expect("NextStreamRequest in api.proto");
        let fields: Vec<(&str, i32, Type, Label, &str)> = message
            .field
            .iter()
            .map(|f| (f.name(), f.number(), f.r#type(), f.label(), f.type_name()))
            .collect();
        assert_eq!(
            fields,
            [
                ("id", 1, Type::Uint64, Label::Optional, ""),
                (
                    "batch",
                    2,
                    Type::Message,
                    Label::Optional,
                    ".seqd.v1.NextBatchRequest"
                ),
                ("packed_ranges", 4, Type::Bool, Label::Optional, ""),
            ]
        );
        // And the struct writes those numbers.
        let sent = super::NextStreamRequest {
            id: 1,
            batch: Some(prost::bytes::Bytes::from_static(b"")),
            packed_ranges: true,
        }
        .encode_to_vec();
        assert_eq!(sent, [0x08, 1, 0x12, 0, 0x20, 1]);
    }
}
