//! The public `Sequencer` service.

use std::collections::HashSet;

use tonic::{Request, Response, Status};

use std::time::Instant;

use super::{invalid, observe, status_from, PeerAddrs};
use crate::core::types::MAX_BATCH_ITEMS;
use crate::core::{InvalidArgument, Namespaces, RequestId, SeqKey};
use crate::pb::sequencer_server::Sequencer;
use crate::pb::{
    CurrentRequest, CurrentResponse, NextBatchRequest, NextBatchResponse, NextRequest,
    NextResponse, Range,
};
use crate::raft::NodeHandle;

pub struct SequencerService {
    node: NodeHandle,
    namespaces: Namespaces,
    peers: PeerAddrs,
}

impl SequencerService {
    pub fn new(node: NodeHandle, namespaces: Namespaces, peers: PeerAddrs) -> Self {
        Self {
            node,
            namespaces,
            peers,
        }
    }

    fn key(&self, namespace: &str, key: String) -> Result<SeqKey, InvalidArgument> {
        let ns = self.namespaces.resolve(namespace)?;
        SeqKey::try_new(&self.namespaces, ns, key)
    }
}

#[tonic::async_trait]
impl Sequencer for SequencerService {
    async fn next(&self, request: Request<NextRequest>) -> Result<Response<NextResponse>, Status> {
        let start = Instant::now();
        let result = self.next_inner(request).await;
        observe("Next", start, &result);
        result
    }

    async fn next_batch(
        &self,
        request: Request<NextBatchRequest>,
    ) -> Result<Response<NextBatchResponse>, Status> {
        let start = Instant::now();
        let result = self.next_batch_inner(request).await;
        observe("NextBatch", start, &result);
        result
    }

    async fn current(
        &self,
        request: Request<CurrentRequest>,
    ) -> Result<Response<CurrentResponse>, Status> {
        let start = Instant::now();
        let result = self.current_inner(request).await;
        observe("Current", start, &result);
        result
    }
}

impl SequencerService {
    #[tracing::instrument(skip_all, fields(namespace = %request.get_ref().namespace, count = request.get_ref().count))]
    async fn next_inner(
        &self,
        request: Request<NextRequest>,
    ) -> Result<Response<NextResponse>, Status> {
        let req = request.into_inner();
        let key = self.key(&req.namespace, req.key).map_err(invalid)?;
        let count = self
            .namespaces
            .check_count(key.namespace(), req.count)
            .map_err(invalid)?;
        let request_id = RequestId::try_new(req.request_id).map_err(invalid)?;
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
        }))
    }

    #[tracing::instrument(skip_all, fields(namespace = %request.get_ref().namespace, items = request.get_ref().items.len()))]
    async fn next_batch_inner(
        &self,
        request: Request<NextBatchRequest>,
    ) -> Result<Response<NextBatchResponse>, Status> {
        let req = request.into_inner();
        let ns = self.namespaces.resolve(&req.namespace).map_err(invalid)?;
        if req.items.is_empty() {
            return Err(invalid(InvalidArgument::EmptyBatch));
        }
        if req.items.len() > MAX_BATCH_ITEMS {
            return Err(invalid(InvalidArgument::TooManyItems {
                len: req.items.len(),
                max: MAX_BATCH_ITEMS,
            }));
        }
        let mut seen = HashSet::with_capacity(req.items.len());
        let mut items = Vec::with_capacity(req.items.len());
        for (index, item) in req.items.into_iter().enumerate() {
            let wrap = |e| InvalidArgument::Item {
                index,
                source: Box::new(e),
            };
            let key =
                SeqKey::try_new(&self.namespaces, ns, item.key).map_err(|e| invalid(wrap(e)))?;
            let count = self
                .namespaces
                .check_count(ns, item.count)
                .map_err(|e| invalid(wrap(e)))?;
            if !seen.insert(key.key().to_string()) {
                return Err(invalid(InvalidArgument::DuplicateKey {
                    index,
                    key: key.key().to_string(),
                }));
            }
            items.push((key, count));
        }
        let keys: Vec<String> = items.iter().map(|(k, _)| k.key().to_string()).collect();
        let grant = self
            .node
            .allocate(items, None)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        let ranges = keys
            .into_iter()
            .zip(grant.ranges)
            .map(|(key, r)| Range {
                key,
                first: r.first(),
                count: r.count(),
            })
            .collect();
        Ok(Response::new(NextBatchResponse {
            ranges,
            epoch: grant.epoch,
        }))
    }

    #[tracing::instrument(skip_all, fields(namespace = %request.get_ref().namespace))]
    async fn current_inner(
        &self,
        request: Request<CurrentRequest>,
    ) -> Result<Response<CurrentResponse>, Status> {
        let req = request.into_inner();
        let key = self.key(&req.namespace, req.key).map_err(invalid)?;
        let (current, epoch) = self
            .node
            .current(key)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        Ok(Response::new(CurrentResponse { current, epoch }))
    }
}
