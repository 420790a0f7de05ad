//! The operator-facing `Admin` service.

use tonic::{Request, Response, Status};

use super::{status_from, PeerAddrs};
use crate::pb::admin_server::Admin;
use crate::pb::{StatusRequest, StatusResponse, TransferLeaderRequest, TransferLeaderResponse};
use crate::raft::NodeHandle;

pub struct AdminService {
    node: NodeHandle,
    peers: PeerAddrs,
}

impl AdminService {
    pub fn new(node: NodeHandle, peers: PeerAddrs) -> Self {
        Self { node, peers }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self
            .node
            .status()
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        Ok(Response::new(StatusResponse {
            id: s.id,
            role: s.role,
            term: s.term,
            leader_id: s.leader_id,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            first_index: s.first_index,
            last_index: s.last_index,
            compacted_index: s.compacted_index,
            epoch: s.epoch,
            serving: s.serving,
            active_keys: s.active_keys,
            voters: s.voters,
            snapshots_installed: s.snapshots_installed,
        }))
    }

    #[tracing::instrument(skip_all, fields(to = request.get_ref().to))]
    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let to = match request.into_inner().to {
            0 => None,
            id => Some(id),
        };
        self.node
            .transfer_leader(to)
            .await
            .map_err(|e| status_from(e, &self.peers))?;
        Ok(Response::new(TransferLeaderResponse {}))
    }
}
