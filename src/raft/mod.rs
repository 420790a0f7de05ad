//! The Raft node: one task (the node loop, on the server's runtime) owns
//! raft-rs's `RawNode`, the RocksDB log and state machine, and the
//! allocator core. Everything else talks to it
//! through a mailbox ([`NodeHandle`]) and gets answers on oneshot channels.

mod logger;
mod node;
mod read_peers;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::raft::prelude::Message;
use tokio::sync::{mpsc, oneshot};

use crate::core::{RequestId, SeqKey, SeqRange};

pub use node::{spawn, NodeParams, NodeTesting, NodeTime, VirtualTime};
pub(crate) use node::{Node, Outbox, Syncer};

/// Numbers handed out by one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// One range per requested key, in request order.
    pub ranges: Vec<SeqRange>,
    pub epoch: u64,
    /// The ranges came from the request id's record (a retry), not from
    /// this call's allocation.
    pub replayed: bool,
}

/// A node's view of itself and the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: String,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Last index covered by compaction or an installed snapshot.
    pub compacted_index: u64,
    pub epoch: u64,
    /// Whether this node currently serves allocations (leader, caught up).
    pub serving: bool,
    pub active_keys: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Snapshots this node has installed since it started.
    pub snapshots_installed: u64,
    pub worker: Option<u64>,
    pub ids_active: bool,
    pub fence_ms: u64,
    /// Each peer's clock offset (ms, positive: ahead of this node's), as
    /// estimated from its Raft frames.
    pub peer_clocks: Vec<(u64, i64)>,
    /// How far this node's time runs past the cluster's fences, when too
    /// far (0 otherwise).
    pub ahead_of_cluster_ms: u64,
    /// On the leader, the voters answering it now (itself included).
    pub answering: Vec<u64>,
    /// On a leader handing over, how far it got.
    pub handover: Option<HandoverProgress>,
}

/// How far a leader's handover got (see [`NodeHandle::transfer_leader`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverProgress {
    pub phase: HandoverStage,
    pub elapsed: std::time::Duration,
    /// Keys held when the handover began.
    pub keys_at_start: u64,
    /// Releasing: keys looked at so far, of `keys_at_start` (a window at a
    /// time), and idle keys proposed for release so far.
    pub keys_looked_at: u64,
    pub keys_released: u64,
    /// Trimming and after: keys the trim covers, and those not yet proposed.
    pub trim_keys: u64,
    pub trim_keys_left: u64,
}

/// A handover's phase, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverStage {
    /// Serving, releasing the keys unused for a second.
    Releasing,
    /// Not serving, committing the exact position of every key still held.
    Trimming,
    /// Trimmed (or given up on the trim); leadership is moving.
    Transferring,
}

impl HandoverStage {
    pub fn as_str(self) -> &'static str {
        match self {
            HandoverStage::Releasing => "releasing",
            HandoverStage::Trimming => "trimming",
            HandoverStage::Transferring => "transferring",
        }
    }
}

/// A membership change for [`NodeHandle::change_membership`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    AddLearner { id: u64, addr: String },
    AddVoter { id: u64, addr: String },
    Remove { id: u64 },
}

/// Voters and learners after a change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// Faults a test may inject (only with `testing.allow_fault_injection`).
#[derive(Debug, Default)]
pub struct Faults {
    /// Drop every Raft message to and from this node.
    pub isolated: std::sync::atomic::AtomicBool,
    /// Delay every fsync of the Raft log by this many ms (a slow disk).
    pub sync_delay_ms: std::sync::atomic::AtomicU64,
}

/// The node's Snowflake issuer and the clock it reads, shared by the node
/// loop (worker and fence updates) and the `Ids` service (issuing).
pub struct IdState {
    pub issuer: std::sync::Mutex<crate::core::Issuer>,
    pub clock: std::sync::Arc<dyn crate::core::Clock>,
}

impl IdState {
    pub fn new(issuer: crate::core::Issuer, clock: std::sync::Arc<dyn crate::core::Clock>) -> Self {
        Self {
            issuer: std::sync::Mutex::new(issuer),
            clock,
        }
    }

    /// Locks the issuer. A panic while holding it cannot leave it
    /// half-updated (every method checks before it mutates), so a poisoned
    /// lock is usable.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, crate::core::Issuer> {
        self.issuer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues `count` IDs into `out` (all or none) at the clock's time;
    /// returns the clock report and the worker that stamped them.
    pub fn issue(
        &self,
        count: u64,
        out: &mut Vec<u64>,
    ) -> Result<(crate::core::ClockReport, u64), crate::core::IdError> {
        let mut issuer = self.lock();
        // Read under the lock: a caller that read the clocks and then
        // waited for it would bring a reading older than the last stamp,
        // ridden (or refused) as if the clock had stepped back.
        let now = self.clock.now_ms();
        let mono = self.clock.mono_ms();
        let report = issuer.issue(now, mono, count, out)?;
        Ok((report, issuer.worker().unwrap_or_default()))
    }
}

/// Why the node could not serve a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("not the leader")]
    NotLeader { leader: Option<u64> },
    #[error("{0}")]
    Exhausted(String),
    #[error("request_id: already used for other keys or counts")]
    RequestIdReused,
    #[error("timed out after {0:?} waiting for the cluster")]
    Timeout(Duration),
    #[error("the node is stopping")]
    Stopped,
    #[error("membership: {0}")]
    Membership(String),
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// The node's mailbox. Unbounded: its senders (gRPC handlers, the peer
/// transport) must never block, and calls carry their own deadlines.
pub(crate) type Mailbox = mpsc::UnboundedSender<Input>;

/// What the node loop receives.
pub(crate) enum Input {
    /// A Raft message from a peer.
    Raft(Box<Message>),
    /// A peer could not be reached; raft-rs slows down replication to it.
    Unreachable(u64),
    /// A snapshot to `to` reached its node (or could not be sent).
    SnapshotSent(SnapshotReport),
    /// Every write made before Ready `number` was handled is durable.
    Persisted(u64),
    Allocate {
        items: Vec<(SeqKey, u32)>,
        request_id: Option<RequestId>,
        reply: Reply<Grant>,
        deadline: Instant,
    },
    Current {
        key: SeqKey,
        reply: Reply<(u64, u64)>,
        deadline: Instant,
    },
    Status(oneshot::Sender<NodeStatus>),
    /// Trim, then move leadership to `to` (or the most caught-up follower).
    TransferLeader {
        to: Option<u64>,
        reply: Reply<()>,
    },
    ChangeMembership {
        change: MembershipChange,
        reply: Reply<Membership>,
    },
    /// Trim and hand over leadership if leader, then stop the loop.
    Shutdown(oneshot::Sender<()>),
}

/// Every member's address as this node knows it: configured, and recorded
/// by membership changes (which win). The node keeps it current; the
/// services read it for the leader hints they send.
#[derive(Clone, Default)]
pub struct PeerAddrs(Arc<std::sync::RwLock<HashMap<u64, String>>>);

impl PeerAddrs {
    pub fn get(&self, id: u64) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub(crate) fn set(&self, id: u64, addr: &str) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, addr.to_string());
    }

    pub(crate) fn remove(&self, id: u64) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

/// What became of one snapshot message to a follower.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SnapshotReport {
    pub to: u64,
    /// The snapshot's index: a report on an older one (a send that
    /// outlived a newer one) changes nothing.
    pub index: u64,
    /// Which send it reports on: the outbox numbers every snapshot
    /// message it is handed (see [`Outbox::newest_snapshot_send`]). raft-rs
    /// sends the same snapshot again after a failure, and a report on the
    /// earlier send arriving late (an aborted send, at a peer's address
    /// change) would otherwise end the one under way.
    pub send: u64,
    /// Its size, which sets how long its install may take.
    pub bytes: u64,
    pub ok: bool,
}

impl SnapshotReport {
    pub(crate) fn of(msg: &Message, send: u64, ok: bool) -> Self {
        let snap = msg.get_snapshot();
        Self {
            to: msg.to,
            index: snap.get_metadata().index,
            send,
            bytes: snap.get_data().len() as u64,
            ok,
        }
    }
}

/// Numbers the snapshot messages an outbox is handed (from 1), and keeps
/// each peer's newest: only a report on that one may end the snapshot
/// raft-rs counts as out to the peer.
#[derive(Debug, Default)]
pub(crate) struct SnapshotSends {
    last: u64,
    newest: HashMap<u64, u64>,
}

impl SnapshotSends {
    /// The number of `msg`'s send if it is a snapshot, now the newest to
    /// its peer.
    pub(crate) fn number(&mut self, msg: &Message) -> Option<u64> {
        if msg.get_msg_type() != ::raft::prelude::MessageType::MsgSnapshot {
            return None;
        }
        self.last += 1;
        self.newest.insert(msg.to, self.last);
        Some(self.last)
    }

    pub(crate) fn newest(&self, to: u64) -> Option<u64> {
        self.newest.get(&to).copied()
    }
}

/// Cheap, cloneable access to the node loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: Mailbox,
    request_timeout: Duration,
}

impl NodeHandle {
    pub(crate) fn new(tx: Mailbox, request_timeout: Duration) -> Self {
        Self {
            tx,
            request_timeout,
        }
    }

    pub(crate) fn send(&self, input: Input) -> Result<(), NodeError> {
        self.tx.send(input).map_err(|_| NodeError::Stopped)
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>, Instant) -> Input) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        let deadline = Instant::now() + self.request_timeout;
        self.send(make(tx, deadline))?;
        // The node fails calls at their deadline itself; the margin covers a
        // node loop that is stuck on a slow disk.
        match tokio::time::timeout(self.request_timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout(self.request_timeout)),
        }
    }

    /// Allocates `count` numbers for each key (all in one namespace,
    /// distinct keys).
    pub async fn allocate(
        &self,
        items: Vec<(SeqKey, u32)>,
        request_id: Option<RequestId>,
    ) -> Result<Grant, NodeError> {
        self.ask(|reply, deadline| Input::Allocate {
            items,
            request_id,
            reply,
            deadline,
        })
        .await
    }

    /// The highest number that may have been handed out for `key`, and the
    /// epoch.
    pub async fn current(&self, key: SeqKey) -> Result<(u64, u64), NodeError> {
        self.ask(|reply, deadline| Input::Current {
            key,
            reply,
            deadline,
        })
        .await
    }

    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::Status(tx))?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Releases idle keys, trims the rest and moves leadership. Waits for
    /// the handover to end, not for the request timeout: with many keys it
    /// takes longer. The node answers once leadership has moved, or has
    /// been lost otherwise (a leader that cannot commit its trim steps
    /// down after an election timeout, `check_quorum`), or the transfer
    /// itself (after the trim) timed out.
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::TransferLeader { to, reply })?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Adds, promotes or removes a node. Must be sent to the leader.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Membership, NodeError> {
        self.ask(|reply, _| Input::ChangeMembership { change, reply })
            .await
    }

    /// Hands over leadership cleanly (if leader) and stops the node loop.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Input::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Clock, Issuer, Layout};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Both clocks at one settable time.
    struct HandClock(AtomicU64);

    impl Clock for HandClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn mono_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A call that waits for the issuer while another stamps, and time
    /// moves on two seconds meanwhile (a VM's stall), reads the clock once
    /// it holds the issuer: it is not refused as a step back of two
    /// seconds, beyond the one second ridden.
    #[test]
    fn a_call_waiting_for_the_issuer_reads_the_clock_once_it_holds_it() {
        let start = 1_800_000_000_000;
        let clock = Arc::new(HandClock(AtomicU64::new(start)));
        let mut issuer = Issuer::new(
            Layout::try_new(1_704_067_200_000, 41, 10, 12).unwrap(),
            1_000,
            3_000,
        );
        issuer.assign_worker(7, 0);
        issuer.own_fence(start + 60_000);
        let ids = Arc::new(IdState::new(issuer, clock.clone()));

        let mut holder = ids.lock();
        let waiting = std::thread::spawn({
            let ids = ids.clone();
            move || {
                let mut out = Vec::new();
                ids.issue(1, &mut out).map(|_| out[0])
            }
        });
        // Time for the other thread to reach the lock. A thread blocked on
        // a std mutex cannot be observed; a sleep too short only lets the
        // old order (clock read before the lock) pass too, it never fails
        // the right one.
        std::thread::sleep(std::time::Duration::from_millis(200));
        clock.0.store(start + 2_000, Ordering::SeqCst);
        let mut first = Vec::new();
        holder
            .issue(clock.now_ms(), clock.mono_ms(), 1, &mut first)
            .unwrap();
        drop(holder);
        let second = waiting.join().unwrap().expect("the waiting call is served");
        assert!(second > first[0]);
    }
}
