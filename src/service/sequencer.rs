//! The public `Sequencer` service.

use std::collections::HashSet;
use std::pin::Pin;

use futures::{Stream, StreamExt};
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

/// A `NextBatch` request, checked: its items, and their keys as sent, in
/// the same order (each range of the reply names its key).
#[derive(Debug)]
pub struct BatchCall {
    pub items: Vec<(SeqKey, u32)>,
    pub keys: Vec<String>,
}

/// Checks a `NextBatch` request: every item, no key twice.
pub fn parse_next_batch(
    namespaces: &Namespaces,
    req: NextBatchRequest,
) -> Result<BatchCall, InvalidArgument> {
    let ns = namespaces.resolve(&req.namespace)?;
    if req.items.is_empty() {
        return Err(InvalidArgument::EmptyBatch);
    }
    if req.items.len() > MAX_BATCH_ITEMS {
        return Err(InvalidArgument::TooManyItems {
            len: req.items.len(),
            max: MAX_BATCH_ITEMS,
        });
    }
    let mut items = Vec::with_capacity(req.items.len());
    let mut keys = Vec::with_capacity(req.items.len());
    for (index, item) in req.items.into_iter().enumerate() {
        let wrap = |e| InvalidArgument::Item {
            index,
            source: Box::new(e),
        };
        // Copied, so that the reply can move the request's string rather
        // than allocate another (a short key's copy is inline).
        let key = SeqKey::try_copy(namespaces, ns, &item.key).map_err(wrap)?;
        let count = namespaces.check_count(ns, item.count).map_err(wrap)?;
        items.push((key, count));
        keys.push(item.key);
    }
    // Checked once every item is; the first repeat is named. foldhash, as
    // the allocator's key map (src/core/segment.rs), seeded per set.
    let mut seen =
        HashSet::with_capacity_and_hasher(keys.len(), foldhash::fast::RandomState::default());
    if let Some(index) = keys.iter().position(|k| !seen.insert(k.as_str())) {
        return Err(InvalidArgument::DuplicateKey {
            index,
            key: keys[index].clone(),
        });
    }
    Ok(BatchCall { items, keys })
}

/// The reply to a batch: each key as sent, with its range.
pub fn batch_response(keys: Vec<String>, grant: &Grant) -> NextBatchResponse {
    let ranges = keys
        .into_iter()
        .zip(&grant.ranges)
        .map(|(key, r)| Range {
            key,
            first: r.first(),
            count: r.count(),
        })
        .collect();
    NextBatchResponse {
        ranges,
        epoch: grant.epoch,
        replayed: grant.replayed,
    }
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
    /// request that cannot be read ends the stream with its status.
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
        let replies = self
            .stopping
            .cut(request.into_inner())
            .map(move |message| {
                // Counted open until the replies stream is dropped: ended,
                // or its client gone.
                let _open = &open;
                let service = service.clone();
                async move {
                    let NextStreamRequest { id, batch } = message?;
                    let call = Observed::start("NextBatch");
                    let result = match batch {
                        Some(batch) => service.next_batch_inner(Request::new(batch)).await,
                        None => Err(Status::invalid_argument("batch: missing")),
                    };
                    call.finish(&result);
                    Ok(NextStreamReply::answering(
                        id,
                        result.map(Response::into_inner),
                    ))
                }
            })
            .buffer_unordered(STREAM_BATCHES_IN_FLIGHT);
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
        let mut req = request.into_inner();
        let request_id =
            RequestId::try_new(std::mem::take(&mut req.request_id)).map_err(invalid)?;
        let BatchCall { items, keys } = parse_next_batch(&self.namespaces, req).map_err(invalid)?;
        let grant = self
            .node
            .allocate(items, request_id)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        Ok(Response::new(batch_response(keys, &grant)))
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
