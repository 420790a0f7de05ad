//! The public `Ids` service: Snowflake IDs from every node.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Observed;
use crate::core::IdError;
use crate::metrics as m;
use crate::pb::ids_server::Ids;
use crate::pb::{
    DecodeRequest, DecodeResponse, NextIdsRequest, NextIdsResponse, NextIdsStreamReply,
    NextIdsStreamRequest,
};
use crate::raft::IdState;

#[derive(Clone)]
pub struct IdsService {
    ids: Arc<IdState>,
    max_count: u32,
    stopping: super::Stopping,
}

impl IdsService {
    pub fn new(ids: Arc<IdState>, max_count: u32, stopping: super::Stopping) -> Self {
        Self {
            ids,
            max_count,
            stopping,
        }
    }
}

/// Maps every issuing error to a status.
fn id_status(e: IdError) -> Status {
    match e {
        // This node cannot issue now; another node may.
        IdError::NoWorker | IdError::FenceReached { .. } | IdError::AheadOfCluster { .. } => {
            Status::unavailable(e.to_string())
        }
        IdError::ClockBackwards { .. } | IdError::ClockBeforeEpoch { .. } => {
            Status::failed_precondition(e.to_string())
        }
        IdError::OverCapacity { .. } => Status::resource_exhausted(e.to_string()),
        IdError::LayoutExhausted => Status::resource_exhausted(e.to_string()),
    }
}

#[tonic::async_trait]
impl Ids for IdsService {
    async fn next_ids(
        &self,
        request: Request<NextIdsRequest>,
    ) -> Result<Response<NextIdsResponse>, Status> {
        let call = Observed::start("NextIds");
        let result = self.next_ids_inner(request);
        call.finish(&result);
        result
    }

    type NextIdsStreamStream =
        Pin<Box<dyn Stream<Item = Result<NextIdsStreamReply, Status>> + Send + 'static>>;

    /// Each request is served as a `NextIds` (same checks, same metrics,
    /// recorded as `NextIds`) and answered with its id, in order: issuing
    /// never waits. A request that cannot be read ends the stream with its
    /// status.
    async fn next_ids_stream(
        &self,
        request: Request<Streaming<NextIdsStreamRequest>>,
    ) -> Result<Response<Self::NextIdsStreamStream>, Status> {
        let open = super::OpenStream::new(m::ID_STREAMS_TOTAL, m::ID_STREAMS_OPEN);
        let service = self.clone();
        let replies = self.stopping.cut(request.into_inner()).map(move |message| {
            // Counted open until the replies stream is dropped: ended, or
            // its client gone.
            let _open = &open;
            let NextIdsStreamRequest { id, request } = message?;
            let call = Observed::start("NextIds");
            let result = match request {
                Some(request) => service.next_ids_inner(Request::new(request)),
                None => Err(Status::invalid_argument("request: missing")),
            };
            call.finish(&result);
            Ok(NextIdsStreamReply::answering(
                id,
                result.map(Response::into_inner),
            ))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        let id = request.into_inner().id;
        let layout = *self.ids.lock().layout();
        let (unix_ms, worker, sequence) = layout.decode(id).ok_or_else(|| {
            Status::invalid_argument("id: has the sign bit set; not a seqd Snowflake ID")
        })?;
        Ok(Response::new(DecodeResponse {
            unix_ms,
            worker,
            sequence,
        }))
    }
}

impl IdsService {
    fn next_ids_inner(
        &self,
        request: Request<NextIdsRequest>,
    ) -> Result<Response<NextIdsResponse>, Status> {
        let count = request.into_inner().count;
        if count == 0 {
            return Err(Status::invalid_argument("count: must be at least 1"));
        }
        if count > self.max_count {
            return Err(Status::invalid_argument(format!(
                "count: {count} is above the maximum of {}",
                self.max_count
            )));
        }
        let mut ids = Vec::new();
        match self.ids.issue(u64::from(count), &mut ids) {
            Ok((report, worker)) => {
                if let Some(back) = report.stepped_back_ms {
                    if report.rode {
                        tracing::warn!(
                            stepped_back_ms = back,
                            "clock stepped back; riding it on the logical clock"
                        );
                    } else {
                        tracing::warn!(
                            stepped_back_ms = back,
                            "clock stepped back, to a time past every ID stamped: nothing to ride"
                        );
                    }
                    metrics::counter!(m::CLOCK_ROLLBACKS_TOTAL, "outcome" => "ridden").increment(1);
                    metrics::histogram!(m::CLOCK_ROLLBACK_SECONDS).record(back as f64 / 1000.0);
                }
                Ok(Response::new(NextIdsResponse { ids, worker }))
            }
            Err(e) => {
                if let IdError::ClockBackwards { .. } = e {
                    // Counted per call refused; logged and measured once
                    // per run of refusals.
                    metrics::counter!(m::CLOCK_ROLLBACKS_TOTAL, "outcome" => "refused")
                        .increment(1);
                    if let Some(by_ms) = self.ids.lock().take_refusal() {
                        tracing::warn!(
                            by_ms,
                            "clock moved back too far; refusing to issue IDs until it catches up"
                        );
                        metrics::histogram!(m::CLOCK_ROLLBACK_SECONDS)
                            .record(by_ms as f64 / 1000.0);
                    }
                }
                Err(id_status(e))
            }
        }
    }
}
