//! Raft messages between nodes: one long-lived gRPC stream per peer, with
//! reconnect. Messages are dropped, never queued without bound, while a peer
//! is unreachable: Raft retransmits what matters.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::raft::prelude::{Message, MessageType};
use protobuf::Message as _;
use tokio::sync::mpsc as tmpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Faults, Input, Mailbox};
use crate::pb::peer_client::PeerClient;
use crate::pb::peer_server::Peer;
use crate::pb::{RaftAck, RaftFrame};

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Largest message a peer may send (snapshots travel in one message).
pub const MAX_PEER_MESSAGE: usize = 512 << 20;

/// Sends raft messages to peers. Owned by the node loop; never blocks.
pub struct Transport {
    self_id: u64,
    rt: tokio::runtime::Handle,
    peers: HashMap<u64, (String, tmpsc::Sender<Message>)>,
    node: Mailbox,
    faults: Arc<Faults>,
}

impl Transport {
    /// Starts one sender task per peer on `rt`.
    pub(crate) fn start(
        rt: &tokio::runtime::Handle,
        self_id: u64,
        peers: &[(u64, String)],
        node: Mailbox,
        faults: Arc<Faults>,
    ) -> Self {
        let mut t = Self {
            self_id,
            rt: rt.clone(),
            peers: HashMap::new(),
            node,
            faults,
        };
        for (id, addr) in peers {
            t.add_peer(*id, addr);
        }
        t
    }

    /// Starts sending to a peer (or follows it to a new address).
    pub fn add_peer(&mut self, id: u64, addr: &str) {
        if id == self.self_id || self.peers.get(&id).is_some_and(|(a, _)| a == addr) {
            return;
        }
        let (tx, rx) = tmpsc::channel(PEER_QUEUE);
        self.rt.spawn(peer_loop(
            self.self_id,
            id,
            addr.to_string(),
            rx,
            self.node.clone(),
        ));
        // Replacing the sender ends the old task (its queue closes).
        self.peers.insert(id, (addr.to_string(), tx));
    }

    pub fn remove_peer(&mut self, id: u64) {
        self.peers.remove(&id);
    }

    pub fn send(&self, msgs: Vec<Message>) {
        if self.faults.isolated.load(Ordering::Relaxed) {
            return;
        }
        for msg in msgs {
            let to = msg.to;
            let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            let Some((_, peer)) = self.peers.get(&to) else {
                tracing::warn!(to, "message for an unknown peer dropped");
                continue;
            };
            if peer.try_send(msg).is_err() {
                if is_snapshot {
                    let _ = self.node.send(Input::SnapshotSent { to, ok: false });
                }
                let _ = self.node.send(Input::Unreachable(to));
            }
        }
    }
}

async fn peer_loop(
    self_id: u64,
    peer_id: u64,
    addr: String,
    mut queue: tmpsc::Receiver<Message>,
    node: Mailbox,
) {
    let mut backoff = Duration::from_millis(20);
    let uri = format!("http://{addr}");
    loop {
        let endpoint = match tonic::transport::Endpoint::from_shared(uri.clone()) {
            Ok(e) => e
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2)),
            Err(e) => {
                tracing::error!(peer_id, %addr, error = %e, "bad peer address; not sending to it");
                return;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer_id, %addr, error = %e, "peer unreachable");
                let _ = node.send(Input::Unreachable(peer_id));
                tokio::time::sleep(backoff).await;
                drop_stale(&mut queue, &node, peer_id);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        tracing::debug!(peer_id, %addr, "connected to peer");
        let (tx, rx) = tmpsc::channel::<RaftFrame>(256);
        let mut client = PeerClient::new(channel).max_encoding_message_size(MAX_PEER_MESSAGE);
        let mut call = tokio::spawn(async move { client.raft(ReceiverStream::new(rx)).await });
        loop {
            tokio::select! {
                msg = queue.recv() => {
                    let Some(msg) = msg else {
                        call.abort();
                        return;
                    };
                    let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
                    let bytes = match msg.write_to_bytes() {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(peer_id, error = %e, "cannot encode raft message");
                            continue;
                        }
                    };
                    let sent = tx.send(RaftFrame { from: self_id, message: bytes }).await.is_ok();
                    if is_snapshot {
                        let _ = node.send(Input::SnapshotSent { to: peer_id, ok: sent });
                    }
                    if !sent {
                        break;
                    }
                }
                res = &mut call => {
                    if let Ok(Err(status)) = res {
                        tracing::debug!(peer_id, %status, "peer stream ended");
                    }
                    break;
                }
            }
        }
        let _ = node.send(Input::Unreachable(peer_id));
        tokio::time::sleep(backoff).await;
        drop_stale(&mut queue, &node, peer_id);
    }
}

/// Drops what queued while the peer could not be reached (up to
/// [`PEER_QUEUE`] messages): stale by now, and Raft sends again what
/// matters. Sent in a burst on reconnecting, a second's worth of a busy
/// leader's heartbeats (read rounds) made the peer answer each, and a
/// leader answers each answer from a follower that lags with a catch-up
/// append: a restarted follower kept the leader's loop busy building
/// appends for seconds, while the other follower heard nothing and started
/// an election. A snapshot among them is reported as not sent, so raft-rs
/// sends it again rather than wait for it.
fn drop_stale(queue: &mut tmpsc::Receiver<Message>, node: &Mailbox, peer_id: u64) {
    while let Ok(msg) = queue.try_recv() {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            let _ = node.send(Input::SnapshotSent {
                to: peer_id,
                ok: false,
            });
        }
    }
}

/// Decodes the Raft message a peer's frame carries; the frame's sender must
/// match the message's.
pub fn decode_frame(frame: &RaftFrame) -> Result<Message, Status> {
    let msg = Message::parse_from_bytes(&frame.message)
        .map_err(|e| Status::invalid_argument(format!("message: not a raft message: {e}")))?;
    if msg.from != frame.from {
        return Err(Status::invalid_argument(format!(
            "from: frame says {} but the message says {}",
            frame.from, msg.from
        )));
    }
    Ok(msg)
}

/// Receives raft messages from peers and feeds them to the node loop.
pub struct PeerService {
    node: Mailbox,
    faults: Arc<Faults>,
    stopping: crate::service::Stopping,
}

impl PeerService {
    pub(crate) fn new(node: Mailbox, faults: Arc<Faults>) -> Self {
        Self {
            node,
            faults,
            stopping: crate::service::Stopping::never(),
        }
    }

    /// Ends every peer's stream once `stopping` is raised: a peer that has
    /// nothing to send (a follower, to another follower) would otherwise
    /// hold the server's graceful stop until its drain timeout.
    pub fn stop_with(mut self, stopping: crate::service::Stopping) -> Self {
        self.stopping = stopping;
        self
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(
        &self,
        request: Request<Streaming<RaftFrame>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let stopped = self.stopping.clone().raised();
        tokio::pin!(stopped);
        loop {
            let frame = tokio::select! {
                frame = stream.message() => frame?,
                () = &mut stopped => return Err(Status::unavailable("node is stopping")),
            };
            let Some(frame) = frame else {
                break;
            };
            let msg = decode_frame(&frame)?;
            if self.faults.isolated.load(Ordering::Relaxed) {
                continue;
            }
            if self.node.send(Input::Raft(Box::new(msg))).is_err() {
                return Err(Status::unavailable("node is stopping"));
            }
        }
        Ok(Response::new(RaftAck {}))
    }
}
