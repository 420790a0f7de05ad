//! The gRPC codec of seqd's generated services and clients: prost's, but
//! a message refused for a string field that is not UTF-8 is answered
//! `INVALID_ARGUMENT`, not `INTERNAL`; and a node decodes `NextBatch`
//! requests holding no more items than a batch may have.
//!
//! prost checks UTF-8 while it decodes, before any handler sees the
//! request, and tonic answers every decode failure `INTERNAL`, as gRPC
//! does for a corrupt message. A key with invalid UTF-8 is bad input like
//! any other (DESIGN I6): the caller should see which field, and that
//! retrying will not help.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// What prost's decode error says of a string field that is not UTF-8.
const NOT_UTF8: &str = "not UTF-8";

#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    prost: ProstCodec<T, U>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self {
            prost: ProstCodec::default(),
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Utf8Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.prost.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Utf8Decoder {
            prost: self.prost.decoder(),
            _pd: PhantomData,
        }
    }
}

/// prost's decoder, with its UTF-8 refusals made `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Utf8Decoder<U> {
    prost: ProstDecoder<U>,
    _pd: PhantomData<U>,
}

impl<U: prost::Message + Default + 'static> Decoder for Utf8Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // A node's `NextBatch` requests are decoded without holding more
        // items than a batch may have, and their refusals counted
        // (`decode_rpc_batch`). tonic-build gives every method this one
        // codec, so the request type is told apart here.
        #[cfg(feature = "server")]
        {
            let mut batch: Option<U> = None;
            let any: &mut dyn std::any::Any = &mut batch;
            if let Some(slot) = any.downcast_mut::<Option<crate::pb::NextBatchRequest>>() {
                *slot = Some(crate::service::sequencer::decode_rpc_batch(buf)?);
                return Ok(batch);
            }
        }
        self.prost.decode(buf).map_err(utf8_refusal)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.prost.buffer_settings()
    }
}

/// The status for bytes prost could not decode as a message, as this
/// codec answers a request it cannot read: `INVALID_ARGUMENT` for a string
/// that is not UTF-8, else `INTERNAL`, as tonic does.
pub fn decode_error(e: prost::DecodeError) -> Status {
    utf8_refusal(Status::internal(e.to_string()))
}

/// A decode failure for a string that is not UTF-8 made `INVALID_ARGUMENT`.
fn utf8_refusal(status: Status) -> Status {
    if status.code() == Code::Internal && status.message().contains(NOT_UTF8) {
        // prost names the message and field ("NextRequest.key: invalid
        // string value: data is not UTF-8 encoded").
        Status::invalid_argument(format!(
            "a string field is not valid UTF-8: {}",
            status.message()
        ))
    } else {
        status
    }
}
