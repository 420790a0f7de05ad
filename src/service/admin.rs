//! The operator-facing `Admin` service.

use tonic::{Request, Response, Status};

use super::{status_from, PeerAddrs};
use crate::pb::admin_server::Admin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::core::SystemClock;
use crate::pb::{
    AddNodeRequest, HandoverProgress, InjectFaultRequest, InjectFaultResponse, MembershipResponse,
    PeerClock, RemoveNodeRequest, StatusRequest, StatusResponse, TransferLeaderRequest,
    TransferLeaderResponse,
};
use crate::raft::{Faults, Membership, MembershipChange, NodeHandle};

fn membership(m: Membership) -> Response<MembershipResponse> {
    Response::new(MembershipResponse {
        voters: m.voters,
        learners: m.learners,
    })
}

pub struct AdminService {
    node: NodeHandle,
    peers: PeerAddrs,
    clock: Arc<SystemClock>,
    faults: Arc<Faults>,
    allow_faults: bool,
    /// Changes (not `Status`) must carry it, if set.
    secret: super::Secret,
}

impl AdminService {
    pub fn new(
        node: NodeHandle,
        peers: PeerAddrs,
        clock: Arc<SystemClock>,
        faults: Arc<Faults>,
        allow_faults: bool,
        secret: super::Secret,
    ) -> Self {
        Self {
            node,
            peers,
            clock,
            faults,
            allow_faults,
            secret,
        }
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
            learners: s.learners,
            has_worker: s.worker.is_some(),
            worker: s.worker.unwrap_or_default(),
            ids_active: s.ids_active,
            fence_ms: s.fence_ms,
            answering: s.answering,
            peer_clocks: s
                .peer_clocks
                .into_iter()
                .map(|(node_id, offset_ms)| PeerClock { node_id, offset_ms })
                .collect(),
            ahead_of_cluster_ms: s.ahead_of_cluster_ms,
            handover: s.handover.map(|h| HandoverProgress {
                phase: h.phase.as_str().into(),
                elapsed_ms: h.elapsed.as_millis() as u64,
                keys_at_start: h.keys_at_start,
                keys_looked_at: h.keys_looked_at,
                keys_released: h.keys_released,
                trim_keys: h.trim_keys,
                trim_keys_left: h.trim_keys_left,
            }),
        }))
    }

    #[tracing::instrument(skip_all, fields(to = request.get_ref().to))]
    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.secret.check(request.metadata(), "TransferLeader")?;
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

    #[tracing::instrument(skip_all, fields(id = request.get_ref().id, voter = request.get_ref().voter))]
    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.secret.check(request.metadata(), "AddNode")?;
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("id: must be at least 1"));
        }
        // A name as well as an IP (`node3:7003` in a compose network),
        // resolved when connecting, as the configured peers are.
        crate::config::check_host_port("addr", &req.addr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let change = if req.voter {
            MembershipChange::AddVoter {
                id: req.id,
                addr: req.addr,
            }
        } else {
            MembershipChange::AddLearner {
                id: req.id,
                addr: req.addr,
            }
        };
        self.node
            .change_membership(change)
            .await
            .map(membership)
            .map_err(|e| status_from(e, &self.peers))
    }

    #[tracing::instrument(skip_all, fields(id = request.get_ref().id))]
    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.secret.check(request.metadata(), "RemoveNode")?;
        let id = request.into_inner().id;
        if id == 0 {
            return Err(Status::invalid_argument("id: must be at least 1"));
        }
        self.node
            .change_membership(MembershipChange::Remove { id })
            .await
            .map(membership)
            .map_err(|e| status_from(e, &self.peers))
    }

    async fn inject_fault(
        &self,
        request: Request<InjectFaultRequest>,
    ) -> Result<Response<InjectFaultResponse>, Status> {
        self.secret.check(request.metadata(), "InjectFault")?;
        if !self.allow_faults {
            return Err(Status::failed_precondition(
                "fault injection is disabled (testing.allow_fault_injection)",
            ));
        }
        let req = request.into_inner();
        self.clock.set_offset_ms(req.clock_offset_ms);
        self.faults.isolated.store(req.isolate, Ordering::Relaxed);
        self.faults
            .sync_delay_ms
            .store(u64::from(req.sync_delay_ms), Ordering::Relaxed);
        tracing::warn!(
            clock_offset_ms = req.clock_offset_ms,
            isolate = req.isolate,
            sync_delay_ms = req.sync_delay_ms,
            "fault injected"
        );
        Ok(Response::new(InjectFaultResponse {}))
    }
}
