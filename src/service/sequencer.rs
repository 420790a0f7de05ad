//! The public `Sequencer` service.

use std::collections::HashSet;
use std::pin::Pin;

use futures::{Stream, StreamExt};
// prost's own varint reader (public, hidden from its docs; the code prost
// derives calls it), so the scan reads varints exactly as prost's decode.
use prost::encoding::decode_varint;
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

use super::{invalid, status_from, Observed, PeerAddrs};
use crate::core::types::MAX_BATCH_ITEMS;
use crate::core::{InvalidArgument, Namespaces, RequestId, SeqKey};
use crate::pb::sequencer_server::Sequencer;
use crate::pb::{
    CurrentRequest, CurrentResponse, NextBatchRequest, NextBatchResponse, NextRequest,
    NextResponse, NextStreamReply, NextStreamRequest, Range,
};
use crate::raft::{Grant, NodeHandle};

/// Batches of one `NextStream` being served at once, each replied to when
/// done: a client pipelines batches (its `max_in_flight` per namespace,
/// and one stream carries every namespace) as it does with separate RPCs,
/// and a slow one holds up no other. Beyond this many the stream is read
/// no further until one is answered (HTTP/2 flow control holds the rest).
const STREAM_BATCHES_IN_FLIGHT: usize = 32;

#[derive(Clone)]
pub struct SequencerService {
    node: NodeHandle,
    namespaces: Namespaces,
    peers: PeerAddrs,
    stopping: super::Stopping,
}

impl SequencerService {
    pub fn new(
        node: NodeHandle,
        namespaces: Namespaces,
        peers: PeerAddrs,
        stopping: super::Stopping,
    ) -> Self {
        Self {
            node,
            namespaces,
            peers,
            stopping,
        }
    }
}

/// A `Next` request, checked.
#[derive(Debug)]
pub struct NextCall {
    pub key: SeqKey,
    pub count: u32,
    pub request_id: Option<RequestId>,
}

fn parse_key(
    namespaces: &Namespaces,
    namespace: &str,
    key: String,
) -> Result<SeqKey, InvalidArgument> {
    let ns = namespaces.resolve(namespace)?;
    SeqKey::try_new(namespaces, ns, key)
}

/// Checks a `Next` request from a client (every field, naming the bad one).
pub fn parse_next(namespaces: &Namespaces, req: NextRequest) -> Result<NextCall, InvalidArgument> {
    let key = parse_key(namespaces, &req.namespace, req.key)?;
    let count = namespaces.check_count(key.namespace(), req.count)?;
    let request_id = RequestId::try_new(req.request_id)?;
    Ok(NextCall {
        key,
        count,
        request_id,
    })
}

/// A `NextBatch` request, checked: its items, and (unless the client asked
/// for ranges without them) their keys as sent, in the same order, for the
/// reply's ranges to name.
#[derive(Debug)]
pub struct BatchCall {
    pub items: Vec<(SeqKey, u32)>,
    pub keys: Option<Vec<String>>,
}

/// Checks a `NextBatch` request: every item, no key twice.
pub fn parse_next_batch(
    namespaces: &Namespaces,
    req: NextBatchRequest,
) -> Result<BatchCall, InvalidArgument> {
    let items = check_items(
        namespaces,
        &req.namespace,
        req.items.iter().map(|i| (i.key.as_str(), i.count)),
    )?;
    // The reply moves the request's strings rather than allocate others.
    let keys = req.items.into_iter().map(|i| i.key).collect();
    Ok(BatchCall {
        items,
        keys: Some(keys),
    })
}

/// Refuses a batch of more than [`MAX_BATCH_ITEMS`] items: checked as
/// it is decoded (see [`decode_next_batch`]), so after any refusal of the
/// message itself (bytes prost cannot read) and before its request id,
/// namespace or items are looked at.
fn check_len(len: usize) -> Result<(), InvalidArgument> {
    if len > MAX_BATCH_ITEMS {
        return Err(InvalidArgument::TooManyItems {
            len,
            max: MAX_BATCH_ITEMS,
        });
    }
    Ok(())
}

/// Checks a batch's items in `namespace`: their number, each key and
/// count (an error names the item), then that no key comes twice (naming
/// the first repeat).
fn check_items<'k>(
    namespaces: &Namespaces,
    namespace: &str,
    items: impl ExactSizeIterator<Item = (&'k str, u32)>,
) -> Result<Vec<(SeqKey, u32)>, InvalidArgument> {
    let len = items.len();
    check_len(len)?;
    let ns = namespaces.resolve(namespace)?;
    if len == 0 {
        return Err(InvalidArgument::EmptyBatch);
    }
    let mut checked = Vec::with_capacity(len);
    // foldhash, as the allocator's key map (src/core/segment.rs), seeded
    // per set.
    let mut seen = HashSet::with_capacity_and_hasher(len, foldhash::fast::RandomState::default());
    let mut repeat = None;
    for (index, (key, count)) in items.enumerate() {
        let wrap = |e| InvalidArgument::Item {
            index,
            source: Box::new(e),
        };
        // Copied: the request keeps its own (a short key's copy is inline).
        let key_checked = SeqKey::try_copy(namespaces, ns, key).map_err(wrap)?;
        let count = namespaces.check_count(ns, count).map_err(wrap)?;
        checked.push((key_checked, count));
        if repeat.is_none() && !seen.insert(key) {
            repeat = Some((index, key));
        }
    }
    // A repeat is named only once every item passed its own checks.
    match repeat {
        Some((index, key)) => Err(InvalidArgument::DuplicateKey {
            index,
            key: key.to_string(),
        }),
        None => Ok(checked),
    }
}

/// Checks a decoded `NextBatch` request, its request id first: what the
/// RPC serves, or the status it refuses it with.
pub fn parse_batch_request(
    namespaces: &Namespaces,
    mut req: NextBatchRequest,
) -> Result<(Option<RequestId>, BatchCall), Status> {
    let request_id = RequestId::try_new(std::mem::take(&mut req.request_id)).map_err(invalid)?;
    Ok((
        request_id,
        parse_next_batch(namespaces, req).map_err(invalid)?,
    ))
}

/// What the `NextBatch` RPC makes of an encoded request:
/// [`decode_next_batch`] (its codec's decode), then
/// [`parse_batch_request`]. [`read_batch`] answers as this does.
pub fn decode_batch_request(
    namespaces: &Namespaces,
    bytes: &[u8],
) -> Result<(Option<RequestId>, BatchCall), Status> {
    parse_batch_request(namespaces, decode_next_batch(bytes)?)
}

/// Decodes a `NextBatchRequest` as prost does (every field read by
/// prost's own code, so the same message and the same refusals) but holds
/// no more than [`MAX_BATCH_ITEMS`] items: a batch with more is refused
/// for its size once the last is read. prost alone would hold them all
/// first, and a 64 MiB message (the most a node reads) of 2-byte empty
/// items is 32 million `BatchItem`s, a gigabyte. The `NextBatch` RPC's
/// codec decodes its requests here (`crate::codec`).
pub fn decode_next_batch(mut buf: impl prost::bytes::Buf) -> Result<NextBatchRequest, Status> {
    use prost::encoding::{decode_key, DecodeContext};
    // NextBatchRequest.items (api.proto).
    const ITEMS: u32 = 2;
    let ctx = DecodeContext::default();
    let mut req = NextBatchRequest::default();
    // Items past the limit are decoded here, one at a time, so that a
    // malformed one is refused as prost refuses it, then dropped.
    let mut past = NextBatchRequest::default();
    let mut len = 0;
    let decode_error = crate::codec::decode_error;
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf).map_err(decode_error)?;
        let into = if tag == ITEMS {
            len += 1;
            if len > MAX_BATCH_ITEMS {
                past.items.clear();
                &mut past
            } else {
                &mut req
            }
        } else {
            &mut req
        };
        into.merge_field(tag, wire_type, &mut buf, ctx.clone())
            .map_err(decode_error)?;
    }
    check_len(len).map_err(invalid)?;
    Ok(req)
}

/// The `NextBatch` RPC's decode of its request, in its codec
/// ([`decode_next_batch`]). A request refused here never reaches the
/// handler, so it is counted here (a `NextBatch` with the refusal's code),
/// as a refused batch on a `NextStream` is.
pub fn decode_rpc_batch(buf: impl prost::bytes::Buf) -> Result<NextBatchRequest, Status> {
    let call = Observed::start("NextBatch");
    let decoded = decode_next_batch(buf);
    match decoded {
        Ok(_) => call.dismiss(),
        Err(_) => call.finish(&decoded),
    }
    decoded
}

/// Reads and checks a `NextStream` request's batch from its encoding: the
/// batch's request id, and the call (with the keys for the reply only if
/// `echo_keys`). Answers as the `NextBatch` RPC would for the same bytes:
/// anything `scan_batch` does not read (a batch too large among them)
/// goes through [`decode_batch_request`], which names what is wrong.
pub fn read_batch(
    namespaces: &Namespaces,
    bytes: &[u8],
    echo_keys: bool,
) -> Result<(Option<RequestId>, BatchCall), Status> {
    let Some(batch) = scan_batch(bytes) else {
        let (request_id, mut call) = decode_batch_request(namespaces, bytes)?;
        if !echo_keys {
            call.keys = None;
        }
        return Ok((request_id, call));
    };
    let request_id = RequestId::try_new(batch.request_id).map_err(invalid)?;
    let items =
        check_items(namespaces, batch.namespace, batch.items.iter().copied()).map_err(invalid)?;
    let keys = echo_keys.then(|| batch.items.iter().map(|(k, _)| k.to_string()).collect());
    Ok((request_id, BatchCall { items, keys }))
}

/// A `NextBatchRequest`'s fields, borrowed from its encoding.
struct WireBatch<'a> {
    namespace: &'a str,
    request_id: &'a str,
    items: Vec<(&'a str, u32)>,
}

/// Reads an encoded `NextBatchRequest` as prost would decode it, without
/// a `String` per key: what its three fields hold, taking the last of a
/// repeated string, as prost does. `None` for anything else (another
/// field or wire type, a malformed length or varint, a string that is not
/// UTF-8, more than [`MAX_BATCH_ITEMS`] items): [`decode_next_batch`]
/// then decides, and names the problem.
fn scan_batch(mut buf: &[u8]) -> Option<WireBatch<'_>> {
    let mut batch = WireBatch {
        namespace: "",
        request_id: "",
        // A short key's item takes about 8 bytes.
        items: Vec::with_capacity((buf.len() / 8).min(MAX_BATCH_ITEMS)),
    };
    while !buf.is_empty() {
        match decode_varint(&mut buf).ok()? {
            // Field 1 (namespace), length-delimited.
            0x0a => batch.namespace = utf8(delimited(&mut buf)?)?,
            // Field 2 (items).
            0x12 if batch.items.len() < MAX_BATCH_ITEMS => {
                batch.items.push(scan_item(delimited(&mut buf)?)?);
            }
            // Field 3 (request_id).
            0x1a => batch.request_id = utf8(delimited(&mut buf)?)?,
            _ => return None,
        }
    }
    Some(batch)
}

/// A `BatchItem`'s key and count, as [`scan_batch`] reads its batch.
fn scan_item(mut buf: &[u8]) -> Option<(&str, u32)> {
    let (mut key, mut count) = ("", 0);
    while !buf.is_empty() {
        match decode_varint(&mut buf).ok()? {
            // Field 1 (key), length-delimited.
            0x0a => key = utf8(delimited(&mut buf)?)?,
            // Field 2 (count), a varint; prost keeps its low 32 bits too.
            0x10 => count = decode_varint(&mut buf).ok()? as u32,
            _ => return None,
        }
    }
    Some((key, count))
}

/// The bytes of a length-delimited field whose key was just read, moving
/// `buf` past them.
fn delimited<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
    if len > buf.len() {
        return None;
    }
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Some(field)
}

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// The reply to a batch: each range naming its key as sent, or, for a
/// client that asked for packed ranges (`keys` is `None`), the ranges as
/// two packed lists.
pub fn batch_response(keys: Option<Vec<String>>, grant: &Grant) -> NextBatchResponse {
    let mut resp = NextBatchResponse {
        epoch: grant.epoch,
        replayed: grant.replayed,
        ..NextBatchResponse::default()
    };
    match keys {
        Some(keys) => {
            resp.ranges = keys
                .into_iter()
                .zip(&grant.ranges)
                .map(|(key, r)| Range {
                    key,
                    first: r.first(),
                    count: r.count(),
                })
                .collect();
        }
        None => {
            resp.firsts = grant.ranges.iter().map(|r| r.first()).collect();
            resp.counts = grant.ranges.iter().map(|r| r.count()).collect();
        }
    }
    resp
}

/// Checks a `Current` request.
pub fn parse_current(
    namespaces: &Namespaces,
    req: CurrentRequest,
) -> Result<SeqKey, InvalidArgument> {
    parse_key(namespaces, &req.namespace, req.key)
}

#[tonic::async_trait]
impl Sequencer for SequencerService {
    async fn next(&self, request: Request<NextRequest>) -> Result<Response<NextResponse>, Status> {
        let call = Observed::start("Next");
        let result = self.next_inner(request).await;
        call.finish(&result);
        result
    }

    async fn next_batch(
        &self,
        request: Request<NextBatchRequest>,
    ) -> Result<Response<NextBatchResponse>, Status> {
        let call = Observed::start("NextBatch");
        let result = self.next_batch_inner(request).await;
        call.finish(&result);
        result
    }

    async fn current(
        &self,
        request: Request<CurrentRequest>,
    ) -> Result<Response<CurrentResponse>, Status> {
        let call = Observed::start("Current");
        let result = self.current_inner(request).await;
        call.finish(&result);
        result
    }

    type NextStreamStream =
        Pin<Box<dyn Stream<Item = Result<NextStreamReply, Status>> + Send + 'static>>;

    /// Each request is served as a `NextBatch` (same checks, same metrics,
    /// recorded as `NextBatch`) and answered with its id when done. A
    /// batch that cannot be read is refused in its reply, as the RPC would
    /// refuse it, and the stream goes on; a stream message that cannot be
    /// read (its id, or its batch's framing) ends the stream with its
    /// status, once the batches before it are answered: their numbers are
    /// taken, and a reply dropped with the stream would leave them a hole
    /// (in a dense namespace too) unless retried with the same request id.
    async fn next_stream(
        &self,
        request: Request<Streaming<NextStreamRequest>>,
    ) -> Result<Response<Self::NextStreamStream>, Status> {
        let open = super::OpenStream::new(
            crate::metrics::NEXT_STREAMS_TOTAL,
            crate::metrics::NEXT_STREAMS_OPEN,
        );
        // Shared by the stream's batches: cloning the service itself would
        // copy the namespace table for every batch.
        let service = std::sync::Arc::new(self.clone());
        let (unreadable, ended_by) = tokio::sync::oneshot::channel::<Status>();
        let messages = self.stopping.cut(request.into_inner()).scan(
            Some(unreadable),
            |unreadable, message| {
                futures::future::ready(match message {
                    Ok(message) => Some(message),
                    Err(status) => {
                        if let Some(tx) = unreadable.take() {
                            let _ = tx.send(status);
                        }
                        None
                    }
                })
            },
        );
        let replies = messages
            .map(move |message| {
                // Counted open until the replies stream is dropped: ended,
                // or its client gone.
                let _open = &open;
                let service = service.clone();
                async move {
                    let NextStreamRequest {
                        id,
                        batch,
                        packed_ranges,
                    } = message;
                    let call = Observed::start("NextBatch");
                    let result = match batch {
                        Some(batch) => service.stream_batch(batch, !packed_ranges).await,
                        None => Err(Status::invalid_argument("batch: missing")),
                    };
                    call.finish(&result);
                    Ok(NextStreamReply::answering(id, result))
                }
            })
            .buffer_unordered(STREAM_BATCHES_IN_FLIGHT)
            .chain(
                futures::stream::once(ended_by)
                    .filter_map(|ended| futures::future::ready(ended.ok().map(Err))),
            );
        Ok(Response::new(Box::pin(replies)))
    }
}

impl SequencerService {
    #[tracing::instrument(level = "debug", skip_all, fields(namespace = %request.get_ref().namespace, count = request.get_ref().count))]
    async fn next_inner(
        &self,
        request: Request<NextRequest>,
    ) -> Result<Response<NextResponse>, Status> {
        let NextCall {
            key,
            count,
            request_id,
        } = parse_next(&self.namespaces, request.into_inner()).map_err(invalid)?;
        let grant = self
            .node
            .allocate(vec![(key, count)], request_id)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        let range = grant.ranges[0];
        Ok(Response::new(NextResponse {
            first: range.first(),
            count: range.count(),
            epoch: grant.epoch,
            replayed: grant.replayed,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(namespace = %request.get_ref().namespace, items = request.get_ref().items.len()))]
    async fn next_batch_inner(
        &self,
        request: Request<NextBatchRequest>,
    ) -> Result<Response<NextBatchResponse>, Status> {
        let (request_id, call) = parse_batch_request(&self.namespaces, request.into_inner())?;
        self.serve_batch(request_id, call).await.map(Response::new)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(bytes = batch.len(), items))]
    async fn stream_batch(
        &self,
        batch: prost::bytes::Bytes,
        echo_keys: bool,
    ) -> Result<NextBatchResponse, Status> {
        let (request_id, call) = read_batch(&self.namespaces, &batch, echo_keys)?;
        tracing::Span::current().record("items", call.items.len());
        // A slice of the connection's receive buffer: not held while the
        // batch waits for the node.
        drop(batch);
        self.serve_batch(request_id, call).await
    }

    async fn serve_batch(
        &self,
        request_id: Option<RequestId>,
        BatchCall { items, keys }: BatchCall,
    ) -> Result<NextBatchResponse, Status> {
        let grant = self
            .node
            .allocate(items, request_id)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        Ok(batch_response(keys, &grant))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(namespace = %request.get_ref().namespace))]
    async fn current_inner(
        &self,
        request: Request<CurrentRequest>,
    ) -> Result<Response<CurrentResponse>, Status> {
        let key = parse_current(&self.namespaces, request.into_inner()).map_err(invalid)?;
        let (current, epoch) = self
            .node
            .current(key)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        Ok(Response::new(CurrentResponse { current, epoch }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::core::types::test_spec;
    use crate::core::NamespaceSpec;
    use crate::pb::BatchItem;

    /// "conv", with keys of at most 8 bytes and counts up to 5, so that
    /// generated batches break both limits.
    fn namespaces() -> Namespaces {
        Namespaces::new(vec![NamespaceSpec {
            max_count: 5,
            max_key_bytes: 8,
            ..test_spec("conv")
        }])
    }

    /// The same answer: equal calls, or errors with the same code and
    /// message.
    fn same(
        a: &Result<(Option<RequestId>, BatchCall), Status>,
        b: &Result<(Option<RequestId>, BatchCall), Status>,
    ) -> bool {
        match (a, b) {
            (Ok((ia, ca)), Ok((ib, cb))) => ia == ib && ca.items == cb.items && ca.keys == cb.keys,
            (Err(ea), Err(eb)) => ea.code() == eb.code() && ea.message() == eb.message(),
            _ => false,
        }
    }

    fn batch() -> impl Strategy<Value = NextBatchRequest> {
        // Mostly good items among few keys (so repeats come, after good
        // items and before bad ones); and empty and over-long keys,
        // multi-byte characters on either side of the byte limit, counts
        // out of bounds.
        let key = prop_oneof![
            4 => prop::sample::select(vec!["a", "b", "c", "\u{e9}\u{e9}\u{e9}\u{e9}"]),
            1 => prop::sample::select(vec!["", "abcdefghi", "\u{e9}\u{e9}\u{e9}\u{e9}x"]),
        ];
        let count = prop_oneof![4 => 1u32..=5, 1 => prop::sample::select(vec![0, 6])];
        let item = (key, count).prop_map(|(k, count)| BatchItem {
            key: k.to_string(),
            count,
        });
        (
            prop_oneof![4 => Just("conv"), 1 => prop::sample::select(vec!["", "nope"])],
            prop::collection::vec(item, 0..8),
            prop::sample::select(vec![String::new(), "r-1".to_string(), "x".repeat(200)]),
        )
            .prop_map(|(ns, items, id)| NextBatchRequest {
                namespace: ns.to_string(),
                items,
                request_id: id,
            })
    }

    proptest! {
        /// A batch prost encodes is read without prost's decode, to the
        /// same call or the same error as the unary RPC's.
        #[test]
        fn a_stream_batch_reads_as_the_unary_rpc_does(req in batch()) {
            let ns = namespaces();
            let bytes = req.encode_to_vec();
            prop_assert!(scan_batch(&bytes).is_some(), "not read by the scan: {req:?}");
            let read = read_batch(&ns, &bytes, true);
            prop_assert!(same(&read, &decode_batch_request(&ns, &bytes)), "{req:?}: {read:?}");
        }

        /// Whatever the bytes (cut short, a byte changed, a field added
        /// or repeated), the stream's read agrees with the unary RPC's.
        #[test]
        fn any_bytes_read_as_the_unary_rpc_reads_them(
            req in batch(),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
            extra in prop::collection::vec(any::<u8>(), 0..6),
            how in 0u8..4,
        ) {
            let ns = namespaces();
            let mut bytes = req.encode_to_vec();
            match how {
                0 => bytes.truncate(cut.index(bytes.len() + 1)),
                1 if !bytes.is_empty() => {
                    let at = flip.0.index(bytes.len());
                    bytes[at] ^= flip.1.max(1);
                }
                2 => bytes.extend_from_slice(&extra),
                _ => bytes.extend_from_slice(&req.encode_to_vec()),
            }
            let read = read_batch(&ns, &bytes, true);
            prop_assert!(same(&read, &decode_batch_request(&ns, &bytes)), "{bytes:?}: {read:?}");
            prop_assert!(decodes_as_prost(&bytes), "{bytes:?}");
        }
    }

    /// `decode_next_batch` gives what prost's decode gives: the same
    /// message, or the same refusal, as the codec would answer it.
    fn decodes_as_prost(bytes: &[u8]) -> bool {
        match (
            decode_next_batch(bytes),
            NextBatchRequest::decode(bytes).map_err(crate::codec::decode_error),
        ) {
            (Ok(ours), Ok(prost)) => ours == prost,
            (Err(ours), Err(prost)) => {
                ours.code() == prost.code() && ours.message() == prost.message()
            }
            _ => false,
        }
    }

    /// The cases the generated batches may miss: a key that is not UTF-8
    /// (left to prost, refused by name, `INVALID_ARGUMENT`), an unknown
    /// field (left to prost), a count sent as a 64-bit varint (its low 32
    /// bits, as prost keeps) and a repeated namespace (the last counts, as
    /// in prost).
    #[test]
    fn corner_cases_read_as_prost_reads_them() {
        let ns = namespaces();
        let item = |key: &[u8], count: u8| {
            let mut b = vec![0x0a, key.len() as u8];
            b.extend_from_slice(key);
            b.extend_from_slice(&[0x10, count]);
            b
        };
        let with_items = |prefix: &[u8], items: &[Vec<u8>]| {
            let mut b = prefix.to_vec();
            for i in items {
                b.push(0x12);
                b.push(i.len() as u8);
                b.extend_from_slice(i);
            }
            b
        };
        let conv = [0x0a, 4, b'c', b'o', b'n', b'v'];
        let not_utf8 = with_items(&conv, &[item(&[0xff, 0xfe], 1)]);
        let err = read_batch(&ns, &not_utf8, true).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("BatchItem.key"), "{err:?}");
        assert!(same(
            &read_batch(&ns, &not_utf8, true),
            &decode_batch_request(&ns, &not_utf8)
        ));

        let unknown_field = {
            let mut b = with_items(&conv, &[item(b"a", 1)]);
            b.extend_from_slice(&[0x20, 7]);
            b
        };
        let long_count = {
            let mut i = vec![0x0a, 1, b'a', 0x10];
            // 2 + 2^32: prost keeps the low 32 bits, 2.
            i.extend_from_slice(&[0x82, 0x80, 0x80, 0x80, 0x10]);
            with_items(&conv, &[i])
        };
        let namespace_twice = {
            let mut b = vec![0x0a, 4, b'n', b'o', b'p', b'e'];
            b.extend_from_slice(&with_items(&conv, &[item(b"a", 1)]));
            b
        };
        for bytes in [unknown_field, long_count, namespace_twice] {
            let read = read_batch(&ns, &bytes, true);
            assert!(
                same(&read, &decode_batch_request(&ns, &bytes)),
                "{bytes:?}: {read:?}"
            );
            assert!(read.is_ok(), "{read:?}");
        }
    }

    /// A batch of more items than a batch may hold is refused for its
    /// size, naming how many came, by the unary RPC's decode (which holds
    /// no more than the limit) and by the stream's read alike, before its
    /// namespace or request id is looked at; one whose last item is
    /// malformed, as prost refuses it; and one of exactly the limit is
    /// decoded as prost decodes it.
    #[test]
    fn an_oversized_batch_is_refused_by_its_size_without_holding_it() {
        let ns = namespaces();
        let at_limit = {
            let mut bytes = vec![0x0a, 4, b'c', b'o', b'n', b'v'];
            for _ in 0..MAX_BATCH_ITEMS {
                // An empty item: 2 bytes on the wire.
                bytes.extend_from_slice(&[0x12, 0]);
            }
            bytes
        };
        assert!(decodes_as_prost(&at_limit));
        assert_eq!(
            decode_next_batch(at_limit.as_slice()).unwrap().items.len(),
            MAX_BATCH_ITEMS
        );

        let items = MAX_BATCH_ITEMS + 25;
        let mut bytes = at_limit.clone();
        bytes.extend_from_slice(&[0x12, 0].repeat(25));
        assert!(scan_batch(&bytes).is_none(), "left to the decode");
        let err = decode_next_batch(bytes.as_slice()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            format!("items: {items} items is more than the maximum of {MAX_BATCH_ITEMS}")
        );
        let read = read_batch(&ns, &bytes, true);
        assert!(same(&read, &Err(err.clone())), "{read:?}");
        assert!(same(&read, &decode_batch_request(&ns, &bytes)), "{read:?}");
        // An unknown namespace and a request id too long: the size first.
        let mut other = vec![0x0a, 4, b'n', b'o', b'p', b'e'];
        other.extend_from_slice(&bytes[6..]);
        // Field 3, 200 bytes long (a two-byte varint).
        other.extend_from_slice(&[0x1a, 0xc8, 0x01]);
        other.extend_from_slice(&[b'r'; 200]);
        assert!(same(&read_batch(&ns, &other, true), &Err(err.clone())));
        assert!(same(&decode_batch_request(&ns, &other), &Err(err)));
        // A malformed item past the limit: prost's refusal.
        bytes.extend_from_slice(&[0x12, 2, 0x0a, 5]);
        assert!(decodes_as_prost(&bytes));
        let read = read_batch(&ns, &bytes, true);
        assert_eq!(read.as_ref().unwrap_err().code(), tonic::Code::Internal);
        assert!(same(&read, &decode_batch_request(&ns, &bytes)), "{read:?}");
    }

    /// A repeated key is named at its first repeat, and only once every
    /// item passed its own checks (the order the unary RPC always had).
    #[test]
    fn the_first_repeat_is_named_after_every_items_own_check() {
        let ns = namespaces();
        let check = |keys: &[&str]| {
            let items = keys.iter().map(|k| (*k, 1));
            check_items(&ns, "conv", items).unwrap_err().to_string()
        };
        assert_eq!(
            check(&["a", "b", "a", "b"]),
            "items[2].key: \"a\" appears more than once"
        );
        assert!(check(&["a", "a", ""]).starts_with("items[2].key:"));
    }

    /// A client that asked for packed ranges gets them, and no key is
    /// copied for its reply; another gets ranges naming their keys.
    #[test]
    fn keys_are_kept_for_the_reply_only_when_it_names_them() {
        let ns = namespaces();
        let req = NextBatchRequest {
            namespace: "conv".into(),
            items: vec![
                BatchItem {
                    key: "a".into(),
                    count: 1,
                },
                BatchItem {
                    key: "b".into(),
                    count: 2,
                },
            ],
            request_id: String::new(),
        };
        let bytes = req.encode_to_vec();
        let (_, echoed) = read_batch(&ns, &bytes, true).unwrap();
        assert_eq!(echoed.keys, Some(vec!["a".to_string(), "b".to_string()]));
        let (_, bare) = read_batch(&ns, &bytes, false).unwrap();
        assert_eq!(bare.keys, None);
        assert_eq!(bare.items, echoed.items);
        let grant = Grant {
            ranges: vec![
                crate::core::SeqRange::try_new(7, 1).unwrap(),
                crate::core::SeqRange::try_new(3, 2).unwrap(),
            ],
            epoch: 4,
            replayed: false,
        };
        let packed = batch_response(bare.keys, &grant);
        assert!(packed.ranges.is_empty(), "{packed:?}");
        assert_eq!((packed.firsts, packed.counts), (vec![7, 3], vec![1, 2]));
        assert_eq!((packed.epoch, packed.replayed), (4, false));
        let named = batch_response(echoed.keys, &grant);
        assert!(named.firsts.is_empty() && named.counts.is_empty());
        let ranges: Vec<(&str, u64, u32)> = named
            .ranges
            .iter()
            .map(|r| (r.key.as_str(), r.first, r.count))
            .collect();
        assert_eq!(ranges, [("a", 7, 1), ("b", 3, 2)]);
    }
}
