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
/// an empty batch is still sent as one. `Message` is written by hand so
/// that a batch field that comes twice is merged as protobuf merges a
/// message field (the second's encoding appended to the first's: its
/// items added, its namespace and request id taking over), where prost's
/// derive for bytes would keep only the last.
/// `tests::the_hand_written_messages_match_the_proto` holds the fields to
/// api.proto's.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct NextStreamRequest {
    /// Field 1.
    pub id: u64,
    /// Field 2: an encoded `NextBatchRequest`.
    pub batch: ::core::option::Option<::prost::bytes::Bytes>,
    /// Field 4: asks for the reply's ranges as `NextBatchResponse.firsts`
    /// and `.counts` (see api.proto).
    pub packed_ranges: bool,
}

impl ::prost::Message for NextStreamRequest {
    fn encode_raw(&self, buf: &mut impl ::prost::bytes::BufMut) {
        use ::prost::encoding;
        if self.id != 0 {
            encoding::uint64::encode(1, &self.id, buf);
        }
        if let Some(batch) = &self.batch {
            encoding::bytes::encode(2, batch, buf);
        }
        if self.packed_ranges {
            encoding::bool::encode(4, &self.packed_ranges, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: ::prost::encoding::WireType,
        buf: &mut impl ::prost::bytes::Buf,
        ctx: ::prost::encoding::DecodeContext,
    ) -> Result<(), ::prost::DecodeError> {
        use ::prost::encoding;
        let named = |field: &'static str| {
            move |mut e: ::prost::DecodeError| {
                e.push("NextStreamRequest", field);
                e
            }
        };
        match tag {
            1 => encoding::uint64::merge(wire_type, &mut self.id, buf, ctx).map_err(named("id")),
            2 => {
                let mut more = ::prost::bytes::Bytes::new();
                encoding::bytes::merge(wire_type, &mut more, buf, ctx).map_err(named("batch"))?;
                self.batch = Some(match self.batch.take() {
                    None => more,
                    Some(first) => {
                        let mut both = Vec::with_capacity(first.len() + more.len());
                        both.extend_from_slice(&first);
                        both.extend_from_slice(&more);
                        both.into()
                    }
                });
                Ok(())
            }
            4 => encoding::bool::merge(wire_type, &mut self.packed_ranges, buf, ctx)
                .map_err(named("packed_ranges")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use ::prost::encoding;
        (if self.id != 0 {
            encoding::uint64::encoded_len(1, &self.id)
        } else {
            0
        }) + self
            .batch
            .as_ref()
            .map_or(0, |batch| encoding::bytes::encoded_len(2, batch))
            + if self.packed_ranges {
                encoding::bool::encoded_len(4, &self.packed_ranges)
            } else {
                0
            }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
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
        assert_eq!(
            super::NextStreamRequest::decode(sent.as_slice()).unwrap(),
            super::NextStreamRequest {
                id: 1,
                batch: Some(prost::bytes::Bytes::from_static(b"")),
                packed_ranges: true,
            }
        );
        assert_eq!(
            super::NextStreamRequest::default().encode_to_vec(),
            [0u8; 0]
        );
    }

    /// A batch field that comes twice is merged as protobuf merges a
    /// message field: as prost merges the second `NextBatchRequest` into
    /// the first (items added, the last namespace and request id kept).
    /// Other fields come in any order, and unknown ones are skipped.
    #[test]
    fn a_batch_sent_twice_is_merged_as_protobuf_merges_it() {
        use super::{BatchItem, NextBatchRequest, NextStreamRequest};
        let item = |key: &str, count| BatchItem {
            key: key.into(),
            count,
        };
        let first = NextBatchRequest {
            namespace: "conv".into(),
            items: vec![item("a", 1), item("b", 2)],
            request_id: "r-1".into(),
        };
        let second = NextBatchRequest {
            namespace: "inbox".into(),
            items: vec![item("c", 3)],
            request_id: String::new(),
        };
        let mut wire = Vec::new();
        prost::encoding::bytes::encode(2, &first.encode_to_vec(), &mut wire);
        prost::encoding::uint64::encode(1, &9, &mut wire);
        // An unknown field, as a newer client might send.
        prost::encoding::string::encode(7, &"later".to_string(), &mut wire);
        prost::encoding::bytes::encode(2, &second.encode_to_vec(), &mut wire);
        prost::encoding::bool::encode(4, &true, &mut wire);
        let read = NextStreamRequest::decode(wire.as_slice()).unwrap();
        assert_eq!((read.id, read.packed_ranges), (9, true));
        let mut merged = first.clone();
        merged.merge(second.encode_to_vec().as_slice()).unwrap();
        assert_eq!(merged.items.len(), 3);
        assert_eq!(
            NextBatchRequest::decode(read.batch.unwrap()).unwrap(),
            merged
        );
        // A batch field of the wrong wire type is refused, naming it.
        let err = NextStreamRequest::decode([0x10, 1].as_slice()).unwrap_err();
        assert!(err.to_string().contains("NextStreamRequest.batch"), "{err}");
    }
}
