//! Raft messages between nodes: one long-lived gRPC stream per peer, with
//! reconnect. Messages are dropped, never queued without bound, while a peer
//! is unreachable: Raft retransmits what matters.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::raft::prelude::{Message, MessageType};
use protobuf::Message as _;
use tokio::sync::mpsc as tmpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Faults, Input, Mailbox, SnapshotReport, SnapshotSends};
use crate::core::{Clock, Layout};
use crate::metrics as m;
use crate::pb::peer_client::PeerClient;
use crate::pb::peer_server::Peer;
use crate::pb::{RaftAck, RaftFrame, SnapshotChunk};
use crate::storage::identity::{Admission, OpenStream, PeerDataIds};
use crate::telemetry::LogEvery;

/// Request metadata naming the sending node and its data directory's id
/// (see [`crate::storage::identity`]).
pub const NODE_ID_HEADER: &str = "seqd-node-id";
pub const DATA_ID_HEADER: &str = "seqd-data-id";
/// Request metadata: how long, in ms, the sending node refuses to vote for
/// another node after hearing from a leader (its `election_ticks - 2` tick
/// lengths). A leader's lease rests on its followers' promises, which their
/// own configuration sets; see [`PeerPromises`].
pub const VOTE_PROMISE_HEADER: &str = "seqd-vote-promise-ms";
/// Request metadata: the sending node's Snowflake layout
/// ([`Layout::to_header`]). Every node of a cluster must stamp IDs under one
/// layout: under other bit widths or another epoch, one node's IDs can equal
/// another's whatever their worker ids. A data directory keeps the layout it
/// started with, but a new member's directory starts with whatever it is
/// given, so nodes also compare layouts on every peer stream, and refuse a
/// peer with another: a node that can neither send nor receive Raft
/// messages never gets a worker id.
pub const LAYOUT_HEADER: &str = "seqd-id-layout";
/// How long a peer that refused this node's stream is left alone.
const REFUSED_RETRY: Duration = Duration::from_secs(1);
/// A refusal is logged once per this long.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 4096;
/// Largest frame a peer may send on the Raft stream. A node from before
/// the `Snapshot` call sends a snapshot there in one frame.
pub const MAX_PEER_MESSAGE: usize = 512 << 20;
/// Size of the chunks a snapshot travels in (see `send_snapshot`).
pub const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Largest snapshot message: rust-protobuf 2, which decodes raft-rs's
/// messages, reads a length-delimited field's size as 32 bits, so a
/// follower could not decode a larger one. About 180 million keys of the
/// 23 bytes each session 31 measured.
pub const MAX_SNAPSHOT_MESSAGE: usize = u32::MAX as usize;

/// Who this node is, as its peer streams name it.
#[derive(Debug, Clone, Copy)]
pub struct Sender {
    pub id: u64,
    pub data_id: u64,
    pub vote_promise: Duration,
    pub layout: Layout,
    pub secret: crate::service::Secret,
}

/// A message queued for a peer; a snapshot's carries the number of its
/// send, which its report names.
struct Queued {
    msg: Message,
    snapshot_send: Option<u64>,
}

/// Sends raft messages to peers. Owned by the node loop; never blocks.
pub struct Transport {
    me: Sender,
    rt: tokio::runtime::Handle,
    peers: HashMap<u64, (String, tmpsc::Sender<Queued>)>,
    snapshot_sends: SnapshotSends,
    /// Messages dropped for each member without an address are logged
    /// once per [`REFUSAL_LOG_EVERY`]: raft-rs sends it every heartbeat.
    unknown_logged: LogEvery,
    node: Mailbox,
    faults: Arc<Faults>,
    /// Stamps each frame, for the peers' clock offset estimates.
    clock: Arc<dyn Clock>,
}

impl Transport {
    /// Starts one sender task per peer on `rt`.
    pub(crate) fn start(
        rt: &tokio::runtime::Handle,
        me: Sender,
        peers: &[(u64, String)],
        node: Mailbox,
        faults: Arc<Faults>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut t = Self {
            me,
            rt: rt.clone(),
            peers: HashMap::new(),
            snapshot_sends: SnapshotSends::default(),
            unknown_logged: LogEvery::new(REFUSAL_LOG_EVERY),
            node,
            faults,
            clock,
        };
        for (id, addr) in peers {
            t.add_peer(*id, addr);
        }
        t
    }

    /// Starts sending to a peer (or follows it to a new address).
    pub fn add_peer(&mut self, id: u64, addr: &str) {
        if id == self.me.id || self.peers.get(&id).is_some_and(|(a, _)| a == addr) {
            return;
        }
        let (tx, rx) = tmpsc::channel(PEER_QUEUE);
        self.rt.spawn(peer_loop(
            self.me,
            id,
            addr.to_string(),
            rx,
            self.node.clone(),
            self.clock.clone(),
        ));
        // Replacing the sender ends the old task (its queue closes).
        self.peers.insert(id, (addr.to_string(), tx));
    }

    pub fn remove_peer(&mut self, id: u64) {
        self.peers.remove(&id);
    }

    pub fn send(&mut self, msgs: Vec<Message>) {
        let isolated = self.faults.isolated.load(Ordering::Relaxed);
        for msg in msgs {
            let to = msg.to;
            let snapshot_send = self.snapshot_sends.number(&msg);
            let report = snapshot_send.map(|send| SnapshotReport::of(&msg, send, false));
            let queued = !isolated
                && match self.peers.get(&to) {
                    Some((_, peer)) => {
                        let queued = peer.try_send(Queued { msg, snapshot_send }).is_ok();
                        if !queued {
                            let _ = self.node.send(Input::Unreachable(to));
                        }
                        queued
                    }
                    None => {
                        if self.unknown_logged.due(to, Instant::now()) {
                            tracing::warn!(
                                to,
                                "messages for a member without an address dropped (logged once \
                                 per 10 s for each): add it again with its address"
                            );
                        }
                        false
                    }
                };
            // A snapshot that did not go is reported at once: raft-rs sends
            // a follower nothing more until it hears what became of one.
            if let (false, Some(report)) = (queued, report) {
                let _ = self.node.send(Input::SnapshotSent(report));
            }
        }
    }

    /// The number of the newest snapshot send to `to`.
    pub fn newest_snapshot_send(&self, to: u64) -> Option<u64> {
        self.snapshot_sends.newest(to)
    }
}

/// Sends `queue` to a peer on one stream at a time, opened at once (so the
/// peer learns this node's data id before any message needs it) and again
/// whenever it breaks.
async fn peer_loop(
    me: Sender,
    peer_id: u64,
    addr: String,
    mut queue: tmpsc::Receiver<Queued>,
    node: Mailbox,
    clock: Arc<dyn Clock>,
) {
    let mut backoff = PEER_BACKOFF_MIN;
    // When the peer last refused this node, as logged.
    let mut refused: Option<Instant> = None;
    let uri = format!("http://{addr}");
    // Snapshot sends in flight, with the report each owes the node.
    let mut snapshot_sends: Vec<(tokio::task::AbortHandle, SnapshotReport)> = Vec::new();
    loop {
        let endpoint = match tonic::transport::Endpoint::from_shared(uri.clone()) {
            Ok(e) => e
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2)),
            Err(e) => {
                tracing::error!(peer_id, %addr, error = %e, "bad peer address; not sending to it");
                // Reports any snapshot queued meanwhile as not sent; once
                // the queue is dropped, the transport reports each one.
                drop_stale(&mut queue, &node);
                return;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer_id, %addr, error = %e, "peer unreachable");
                let _ = node.send(Input::Unreachable(peer_id));
                tokio::time::sleep(backoff).await;
                if drop_stale(&mut queue, &node) {
                    abort_snapshot_sends(snapshot_sends, &node);
                    return;
                }
                backoff = (backoff * 2).min(PEER_BACKOFF_MAX);
                continue;
            }
        };
        let connected = Instant::now();
        tracing::debug!(peer_id, %addr, "connected to peer");
        let mut refusing = false;
        let (tx, rx) = tmpsc::channel::<RaftFrame>(256);
        let mut client = PeerClient::new(channel).max_encoding_message_size(MAX_PEER_MESSAGE);
        let snapshots = client.clone();
        let mut request = Request::new(ReceiverStream::new(rx));
        me.name_in(request.metadata_mut());
        let mut call = tokio::spawn(async move { client.raft(request).await });
        loop {
            tokio::select! {
                queued = queue.recv() => {
                    let Some(Queued { msg, snapshot_send }) = queued else {
                        call.abort();
                        abort_snapshot_sends(snapshot_sends, &node);
                        return;
                    };
                    let report = snapshot_send.map(|send| SnapshotReport::of(&msg, send, false));
                    // Past it a follower could not decode the message.
                    if let Some(r) =
                        report.filter(|r| r.bytes > (MAX_SNAPSHOT_MESSAGE - 4096) as u64)
                    {
                        tracing::error!(
                            peer_id,
                            bytes = r.bytes,
                            limit = MAX_SNAPSHOT_MESSAGE,
                            "snapshot not sent: the state is larger than a raft message can \
                             carry, and this follower cannot catch up by snapshot"
                        );
                        let _ = node.send(Input::SnapshotSent(r));
                        continue;
                    }
                    if let Some(report) = report {
                        let task = tokio::spawn(send_snapshot(
                            me,
                            report,
                            snapshots.clone(),
                            msg,
                            tx.clone(),
                            node.clone(),
                        ));
                        snapshot_sends.retain(|(task, _)| !task.is_finished());
                        snapshot_sends.push((task.abort_handle(), report));
                        continue;
                    }
                    let bytes = match msg.write_to_bytes() {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(peer_id, error = %e, "cannot encode raft message");
                            continue;
                        }
                    };
                    let frame = RaftFrame {
                        from: me.id,
                        message: bytes,
                        sent_ms: clock.now_ms(),
                    };
                    if tx.send(frame).await.is_err() {
                        // The call ended: what it ended with decides the
                        // pause (a refusal), as when it is seen first.
                        let ended = tokio::time::timeout(Duration::from_millis(100), &mut call).await;
                        if let Ok(res) = ended {
                            refusing = stream_ended(peer_id, res, &mut refused);
                        }
                        break;
                    }
                }
                res = &mut call => {
                    refusing = stream_ended(peer_id, res, &mut refused);
                    break;
                }
            }
        }
        let _ = node.send(Input::Unreachable(peer_id));
        // A stream that lived a while was a working one, and the next
        // comes quickly; one that ended at once (the peer stopping, or
        // refusing it as unavailable) backs off as a failed connect does,
        // rather than reconnecting every 20 ms.
        if connected.elapsed() >= PEER_STREAM_STABLE {
            backoff = PEER_BACKOFF_MIN;
        }
        let pause = if refusing { REFUSED_RETRY } else { backoff };
        backoff = (backoff * 2).min(PEER_BACKOFF_MAX);
        tokio::time::sleep(pause).await;
        if drop_stale(&mut queue, &node) {
            abort_snapshot_sends(snapshot_sends, &node);
            return;
        }
    }
}

/// First and longest pause before connecting to a peer again.
const PEER_BACKOFF_MIN: Duration = Duration::from_millis(20);
const PEER_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A peer stream that lived this long worked: the backoff starts over.
const PEER_STREAM_STABLE: Duration = Duration::from_secs(1);

/// What a peer stream's call ended with; whether the peer refused this
/// node (logged once per [`REFUSAL_LOG_EVERY`]; other endings at debug).
fn stream_ended(
    peer_id: u64,
    res: Result<Result<Response<RaftAck>, Status>, tokio::task::JoinError>,
    refused: &mut Option<Instant>,
) -> bool {
    match res {
        // Refused for its data directory, layout or secret: each tried
        // again only every REFUSED_RETRY, and said at the error level.
        Ok(Err(status))
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Unauthenticated
            ) =>
        {
            let now = Instant::now();
            if refused.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY) {
                tracing::error!(
                    peer_id,
                    reason = status.message(),
                    "peer refuses this node's messages"
                );
                *refused = Some(now);
            }
            true
        }
        Ok(Err(status)) => {
            tracing::debug!(peer_id, %status, "peer stream ended");
            false
        }
        _ => false,
    }
}

/// A snapshot message encoded in three parts, the snapshot's data in the
/// middle as the store holds it: shared, not copied. Encoded whole, the
/// message was a second copy of the state on the leader (657 MB at 28
/// million keys) and took seconds to write. Protobuf decoders take fields
/// in any order, so the message's other fields come first, then the
/// snapshot (field 9) with its data (field 1) and metadata (field 2); the
/// follower decodes the same message.
struct EncodedSnapshot {
    head: Vec<u8>,
    data: bytes::Bytes,
    tail: Vec<u8>,
}

impl EncodedSnapshot {
    fn of(msg: &Message) -> protobuf::ProtobufResult<Self> {
        use prost::encoding::{encode_key, encode_varint, key_len, WireType};
        let snap = msg.get_snapshot();
        let data = snap.data.clone();
        let meta = snap.get_metadata().write_to_bytes()?;
        let mut rest = msg.clone();
        rest.clear_snapshot();
        let mut head = rest.write_to_bytes()?;
        let field = |tag: u32, len: usize| key_len(tag) + prost::length_delimiter_len(len) + len;
        encode_key(9, WireType::LengthDelimited, &mut head);
        encode_varint(
            (field(1, data.len()) + field(2, meta.len())) as u64,
            &mut head,
        );
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
        let mut tail = Vec::with_capacity(field(2, meta.len()));
        encode_key(2, WireType::LengthDelimited, &mut tail);
        encode_varint(meta.len() as u64, &mut tail);
        tail.extend_from_slice(&meta);
        Ok(Self { head, data, tail })
    }

    fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.tail.len()
    }

    /// Bytes `from..to` of the encoded message.
    fn slice(&self, from: usize, to: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(to.saturating_sub(from));
        let mut start = 0;
        for part in [&self.head[..], &self.data[..], &self.tail[..]] {
            let end = start + part.len();
            let (lo, hi) = (from.max(start), to.min(end));
            if lo < hi {
                out.extend_from_slice(&part[lo - start..hi - start]);
            }
            start = end;
        }
        out
    }
}

/// Ends the snapshot sends still running to a peer this node no longer
/// sends to (removed, or moved to another address), which would otherwise
/// hold their memory and the peer's until their deadline, and reports
/// each as not sent: raft-rs sends nothing more to a follower while a
/// snapshot to it is out, so at a new address it would wait for the
/// deadline too. A send that ended meanwhile has reported; the node
/// ignores the second report, on a snapshot no longer pending or a send
/// no longer the newest.
fn abort_snapshot_sends(sends: Vec<(tokio::task::AbortHandle, SnapshotReport)>, node: &Mailbox) {
    for (task, report) in sends {
        if !task.is_finished() {
            task.abort();
            let _ = node.send(Input::SnapshotSent(report));
        }
    }
}

impl Sender {
    /// Names this node in a peer call's metadata.
    fn name_in(&self, meta: &mut tonic::metadata::MetadataMap) {
        meta.insert(NODE_ID_HEADER, self.id.into());
        meta.insert(DATA_ID_HEADER, self.data_id.into());
        let promise_ms = u64::try_from(self.vote_promise.as_millis()).unwrap_or(u64::MAX);
        meta.insert(VOTE_PROMISE_HEADER, promise_ms.into());
        if let Ok(layout) = self.layout.to_header().parse() {
            meta.insert(LAYOUT_HEADER, layout);
        }
        self.secret.name_in(meta);
    }
}

/// Sends one encoded snapshot message to a peer in [`SNAPSHOT_CHUNK`]s,
/// on a call of its own beside the Raft stream (HTTP/2 interleaves them,
/// so heartbeats go on while it travels), and reports to the node whether
/// the peer's node took it. A peer from before the call gets it in one
/// frame on the Raft stream, as before, if it is at most
/// [`MAX_PEER_MESSAGE`].
async fn send_snapshot(
    me: Sender,
    report: SnapshotReport,
    mut client: PeerClient<tonic::transport::Channel>,
    msg: Message,
    raft_stream: tmpsc::Sender<RaftFrame>,
    node: Mailbox,
) {
    let started = Instant::now();
    let peer_id = report.to;
    let message = match EncodedSnapshot::of(&msg) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            tracing::error!(peer_id, error = %e, "cannot encode a snapshot");
            let _ = node.send(Input::SnapshotSent(report));
            return;
        }
    };
    drop(msg);
    let total = message.len();
    // raft-rs never gives up on a snapshot it counts as travelling: a call
    // that neither ends nor fails would leave the follower without one. A
    // minute, and a second per MiB.
    let deadline = Duration::from_secs(60 + (total as u64 >> 20));
    let chunks = {
        let message = message.clone();
        // Built as the call sends them: one chunk in memory at a time
        // beside the message.
        tokio_stream::iter((0..total.div_ceil(SNAPSHOT_CHUNK).max(1)).map(move |i| {
            let from = i * SNAPSHOT_CHUNK;
            let to = (from + SNAPSHOT_CHUNK).min(total);
            SnapshotChunk {
                from: me.id,
                total: if i == 0 { total as u64 } else { 0 },
                data: message.slice(from, to),
            }
        }))
    };
    let mut request = Request::new(chunks);
    me.name_in(request.metadata_mut());
    let answer = tokio::time::timeout(deadline, client.snapshot(request))
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer in {deadline:?}"
            )))
        });
    let ok = match answer {
        Ok(_) => {
            metrics::gauge!(m::SNAPSHOT_SEND_SECONDS).set(started.elapsed().as_secs_f64());
            tracing::info!(
                peer_id,
                bytes = total,
                chunks = total.div_ceil(SNAPSHOT_CHUNK),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot sent"
            );
            true
        }
        Err(status) if status.code() == tonic::Code::Unimplemented && total > MAX_PEER_MESSAGE => {
            tracing::error!(
                peer_id,
                bytes = total,
                limit = MAX_PEER_MESSAGE,
                "snapshot not sent: the peer predates snapshots in chunks, and takes at most \
                 one message of the limit; it catches up once it runs this build"
            );
            false
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            tracing::info!(
                peer_id,
                bytes = total,
                "peer predates snapshots in chunks; sending it in one frame"
            );
            let message = message.slice(0, total);
            raft_stream
                .send(RaftFrame {
                    from: me.id,
                    message,
                    // Old peers take no stamp.
                    sent_ms: 0,
                })
                .await
                .is_ok()
        }
        Err(status) => {
            tracing::warn!(peer_id, bytes = total, %status, "sending a snapshot failed");
            false
        }
    };
    let _ = node.send(Input::SnapshotSent(SnapshotReport { ok, ..report }));
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
/// Answers whether the queue is closed: the peer was removed or moved, and
/// its loop must end (a loop for a peer that cannot be reached would
/// otherwise retry for ever, and report it unreachable to the node each
/// time, where a peer at a new address has the same id).
fn drop_stale(queue: &mut tmpsc::Receiver<Queued>, node: &Mailbox) -> bool {
    loop {
        match queue.try_recv() {
            Ok(Queued { msg, snapshot_send }) => {
                if let Some(send) = snapshot_send {
                    let _ = node.send(Input::SnapshotSent(SnapshotReport::of(&msg, send, false)));
                }
            }
            Err(tmpsc::error::TryRecvError::Empty) => return false,
            Err(tmpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
}

/// Decodes the Raft message a peer's frame carries; the frame's sender must
/// match the message's.
pub fn decode_frame(frame: &RaftFrame) -> Result<Message, Status> {
    decode_message(frame.from, &frame.message)
}

/// Decodes a Raft message sent by node `from`, which it must name.
fn decode_message(from: u64, bytes: &[u8]) -> Result<Message, Status> {
    let msg = Message::parse_from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("message: not a raft message: {e}")))?;
    if msg.from != from {
        return Err(Status::invalid_argument(format!(
            "from: frame says {from} but the message says {}",
            msg.from
        )));
    }
    Ok(msg)
}

/// Checks a frame or chunk (`part`) that names `said` as its sender, on a
/// stream or call (`whole`) admitted as node `from`'s: it must name that
/// node, and the node must still be known by the data directory admitted.
fn check_sender(
    from: u64,
    open: &OpenStream,
    said: u64,
    (whole, part): (&str, &str),
) -> Result<(), Status> {
    if from != said {
        return Err(Status::invalid_argument(format!(
            "from: the {whole} is node {from}'s but a {part} says {said}"
        )));
    }
    if !open.still_admitted() {
        return Err(Status::failed_precondition(format!(
            "node {from} is now known here with another data directory: this {whole} is \
             from one it no longer runs on"
        )));
    }
    Ok(())
}

/// Receives raft messages from peers and feeds them to the node loop.
pub struct PeerService {
    node: Mailbox,
    faults: Arc<Faults>,
    stopping: crate::service::Stopping,
    data_ids: Arc<PeerDataIds>,
    promises: PeerPromises,
    layout: Layout,
    /// A peer's stream refused for its layout is logged once per
    /// [`REFUSAL_LOG_EVERY`] for each peer.
    layout_refusals: Arc<std::sync::Mutex<LogEvery>>,
    /// This node's wall clock, against which peers' frame stamps are read.
    clock: Arc<dyn Clock>,
    /// The latest estimate of each peer's clock offset, for `Status`.
    clocks: PeerClocks,
    /// Streams must carry it, if set.
    secret: crate::service::Secret,
}

/// The latest clock offset estimate (ms, positive: the peer's clock is
/// ahead) of each peer with one standing, and the stream that made it.
#[derive(Clone, Default)]
pub struct PeerClocks(Arc<std::sync::Mutex<PeerClocksInner>>);

#[derive(Default)]
struct PeerClocksInner {
    estimates: HashMap<u64, (u64, i64)>,
    next_stream: u64,
}

impl PeerClocks {
    /// A token for one of a peer's streams.
    fn stream(&self) -> u64 {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.next_stream += 1;
        inner.next_stream
    }

    fn set(&self, peer: u64, stream: u64, offset_ms: i64) {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        inner.estimates.insert(peer, (stream, offset_ms));
    }

    /// Withdraws `peer`'s estimate if `stream` made it (a stream that ends
    /// after its replacement has estimated leaves the new estimate alone);
    /// answers whether it did.
    fn withdraw(&self, peer: u64, stream: u64) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ours = inner
            .estimates
            .get(&peer)
            .is_some_and(|(s, _)| *s == stream);
        if ours {
            inner.estimates.remove(&peer);
        }
        ours
    }

    /// Every estimate, by peer id.
    pub fn all(&self) -> Vec<(u64, i64)> {
        let mut all: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .estimates
            .iter()
            .map(|(p, (_, ms))| (*p, *ms))
            .collect();
        all.sort_unstable();
        all
    }
}

/// How long each estimate of a peer's clock offset gathers frames.
const CLOCK_OFFSET_WINDOW: Duration = Duration::from_secs(1);
/// A peer's clock further than this from this node's is logged (once, and
/// again when it is back within).
const CLOCK_OFFSET_WARN_MS: i64 = 1_000;

/// Estimates how far a peer's clock is ahead of this node's (negative:
/// behind) from the stamps on the frames it sends. A frame's stamp less
/// its arrival is the offset less the frame's time on the way, so the
/// largest of a window's (its fastest frame) is the closest: on loopback
/// or a LAN within a millisecond while any frame of the window travels
/// without queueing (a sender backed up for a whole window, stamping
/// frames before they wait, reads as behind by the wait). Delays only
/// ever lower it.
#[derive(Debug)]
struct ClockOffset {
    started: Instant,
    best_ms: Option<i64>,
    /// The last estimate was past [`CLOCK_OFFSET_WARN_MS`].
    far: bool,
    /// When the last estimate was answered, while it stands.
    answered: Option<Instant>,
}

/// An estimate with no frame since for this long is withdrawn: a stream
/// stays open when its peer has nothing to send (raft-rs's followers send
/// only to the leader, so after a leader change the old one hears none).
const CLOCK_OFFSET_STALE: Duration = Duration::from_secs(3);

impl ClockOffset {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            best_ms: None,
            far: false,
            answered: None,
        }
    }

    /// Whether the standing estimate has gone stale by `now` (once: it is
    /// withdrawn).
    fn expired(&mut self, now: Instant) -> bool {
        let stale = self
            .answered
            .is_some_and(|at| now.duration_since(at) > CLOCK_OFFSET_STALE);
        if stale {
            self.answered = None;
            self.best_ms = None;
            self.started = now;
        }
        stale
    }

    /// Takes a frame stamped `sent_ms` (the peer's clock) that arrived at
    /// `arrived_ms` (this node's); at the end of a window answers the
    /// window's estimate.
    fn sample(&mut self, sent_ms: u64, arrived_ms: u64, now: Instant) -> Option<i64> {
        // The stamp is the peer's word: any u64. Past what an i64 holds
        // either way the offset is clamped (never i64::MIN, so that its
        // magnitude is one too).
        let apart = i64::try_from(sent_ms.abs_diff(arrived_ms)).unwrap_or(i64::MAX);
        let offset = if sent_ms >= arrived_ms { apart } else { -apart };
        self.best_ms = Some(self.best_ms.map_or(offset, |b| b.max(offset)));
        if now.duration_since(self.started) < CLOCK_OFFSET_WINDOW {
            return None;
        }
        self.started = now;
        self.answered = Some(now);
        self.best_ms.take()
    }
}

/// The vote promise each peer named on its latest stream. Nodes configure
/// their timing each on its own: a follower restarted with a shorter
/// election timeout (a rolling change) may vote sooner than the leader's
/// own settings say, so the leader's lease is cut to the shortest promise
/// it knows of. A peer from before the header names none.
#[derive(Clone, Default)]
pub struct PeerPromises(Arc<std::sync::Mutex<HashMap<u64, Duration>>>);

impl PeerPromises {
    fn record(&self, node: u64, promise: Duration) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, promise);
    }

    /// The shortest promise named by any of `nodes`.
    pub fn shortest(&self, nodes: impl IntoIterator<Item = u64>) -> Option<Duration> {
        let known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .into_iter()
            .filter_map(|n| known.get(&n).copied())
            .min()
    }
}

impl PeerService {
    pub(crate) fn new(
        node: Mailbox,
        faults: Arc<Faults>,
        data_ids: Arc<PeerDataIds>,
        promises: PeerPromises,
        layout: Layout,
        clock: Arc<dyn Clock>,
        clocks: PeerClocks,
    ) -> Self {
        Self {
            secret: crate::service::Secret::default(),
            node,
            faults,
            stopping: crate::service::Stopping::never(),
            data_ids,
            promises,
            layout,
            layout_refusals: Arc::new(std::sync::Mutex::new(LogEvery::new(REFUSAL_LOG_EVERY))),
            clock,
            clocks,
        }
    }

    /// Takes streams only from peers that name `secret` (when set).
    pub(crate) fn require_secret(mut self, secret: crate::service::Secret) -> Self {
        self.secret = secret;
        self
    }

    /// No estimate of `peer`'s clock stands: NaN, which no comparison
    /// passes, rather than a stale figure.
    fn withdraw_clock_offset(&self, peer: u64, stream: u64) {
        if self.clocks.withdraw(peer, stream) {
            metrics::gauge!(m::PEER_CLOCK_OFFSET_SECONDS, "peer" => peer.to_string()).set(f64::NAN);
        }
    }

    /// Publishes a peer's clock offset estimate, and logs when it goes
    /// past [`CLOCK_OFFSET_WARN_MS`] or comes back.
    fn clock_offset_estimated(
        &self,
        peer: u64,
        stream: u64,
        est: &mut ClockOffset,
        offset_ms: i64,
    ) {
        metrics::gauge!(m::PEER_CLOCK_OFFSET_SECONDS, "peer" => peer.to_string())
            .set(offset_ms as f64 / 1000.0);
        self.clocks.set(peer, stream, offset_ms);
        let far = offset_ms.abs() > CLOCK_OFFSET_WARN_MS;
        if far == est.far {
            return;
        }
        est.far = far;
        if far {
            tracing::warn!(
                peer,
                offset_ms,
                limit_ms = CLOCK_OFFSET_WARN_MS,
                "a peer's clock is far from this node's (positive: the peer's is ahead): \
                 Snowflake IDs carry each node's own time, so one of the two clocks is \
                 wrong; the node that is off against every peer is the one to fix"
            );
        } else {
            tracing::info!(peer, offset_ms, "a peer's clock is back near this node's");
        }
    }

    /// Ends every peer's stream once `stopping` is raised: a peer that has
    /// nothing to send (a follower, to another follower) would otherwise
    /// hold the server's graceful stop until its drain timeout.
    pub fn stop_with(mut self, stopping: crate::service::Stopping) -> Self {
        self.stopping = stopping;
        self
    }

    /// The sending node named by a stream's metadata, with its stream
    /// counted as open, if it is one this node may hear from: a member
    /// known with another data directory lost its Raft state (see
    /// [`crate::storage::identity`]). `None`: a sender from before data
    /// ids, which names neither.
    fn admit(
        &self,
        meta: &tonic::metadata::MetadataMap,
    ) -> Result<Option<(u64, OpenStream)>, Status> {
        let read = |name: &str| -> Result<Option<u64>, Status> {
            meta.get(name)
                .map(|v| {
                    v.to_str()
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Status::invalid_argument(format!("{name}: not a number")))
                })
                .transpose()
        };
        let (Some(from), Some(data_id)) = (read(NODE_ID_HEADER)?, read(DATA_ID_HEADER)?) else {
            return Ok(None);
        };
        self.check_layout(from, meta.get(LAYOUT_HEADER))?;
        let admission = self.data_ids.admit(from, data_id).map_err(|e| {
            tracing::error!(peer_id = from, error = %e, "cannot record a peer's data id");
            Status::unavailable(format!("cannot record this node's data id: {e}"))
        })?;
        match admission {
            Admission::Known(open) => Ok(Some((from, open))),
            Admission::Refused { known, log } => {
                metrics::counter!(m::PEER_STREAMS_REFUSED_TOTAL).increment(1);
                let why = format!(
                    "node {from} is known here with another data directory (data id {known:016x}, \
                     now {data_id:016x}): it lost its Raft state, and its vote or acknowledgement \
                     could lose committed entries; remove it from the cluster and start it with \
                     --join to add it back as a replacement"
                );
                if log {
                    tracing::error!(peer_id = from, "refusing a peer's messages: {why}");
                }
                Err(Status::failed_precondition(why))
            }
        }
    }

    /// Refuses a peer whose stream names another Snowflake layout (see
    /// [`LAYOUT_HEADER`]); a peer from before the header names none.
    fn check_layout(
        &self,
        from: u64,
        named: Option<&tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    ) -> Result<(), Status> {
        let Some(named) = named else {
            return Ok(());
        };
        let theirs = named
            .to_str()
            .ok()
            .and_then(Layout::from_header)
            .ok_or_else(|| {
                Status::invalid_argument(format!("{LAYOUT_HEADER}: not a Snowflake layout"))
            })?;
        if theirs == self.layout {
            return Ok(());
        }
        metrics::counter!(m::PEER_STREAMS_REFUSED_TOTAL).increment(1);
        let why = format!(
            "node {from} issues Snowflake IDs under another layout ({theirs}) than this node \
             ({}): their IDs could collide; every node of a cluster must be configured with the \
             same [snowflake] epoch_ms and bit widths",
            self.layout
        );
        let due = self
            .layout_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due(from, Instant::now());
        if due {
            tracing::error!(peer_id = from, "refusing a peer's messages: {why}");
        }
        Err(Status::failed_precondition(why))
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn raft(
        &self,
        request: Request<Streaming<RaftFrame>>,
    ) -> Result<Response<RaftAck>, Status> {
        self.secret.check(request.metadata(), "a Raft stream")?;
        let sender = self.admit(request.metadata())?;
        if let (Some((from, _)), Some(ms)) = (
            &sender,
            request
                .metadata()
                .get(VOTE_PROMISE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok()),
        ) {
            self.promises.record(*from, Duration::from_millis(ms));
        }
        let mut stream = request.into_inner();
        let stopped = self.stopping.clone().raised();
        tokio::pin!(stopped);
        let mut offset = ClockOffset::new(Instant::now());
        let mut stamped_by = None;
        let stream_token = self.clocks.stream();
        let mut expiry = tokio::time::interval(CLOCK_OFFSET_WINDOW);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ended = loop {
            let frame = tokio::select! {
                frame = stream.message() => frame,
                () = &mut stopped => break Err(Status::unavailable("node is stopping")),
                _ = expiry.tick() => {
                    if let Some(peer) = stamped_by.filter(|_| offset.expired(Instant::now())) {
                        self.withdraw_clock_offset(peer, stream_token);
                    }
                    continue;
                }
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(Response::new(RaftAck {})),
                Err(e) => break Err(e),
            };
            if let Some((from, open)) = &sender {
                if let Err(e) = check_sender(*from, open, frame.from, ("stream", "frame")) {
                    break Err(e);
                }
            }
            let msg = match decode_frame(&frame) {
                Ok(msg) => msg,
                Err(e) => break Err(e),
            };
            if frame.sent_ms != 0 {
                stamped_by = Some(frame.from);
                let arrived = self.clock.now_ms();
                if let Some(ms) = offset.sample(frame.sent_ms, arrived, Instant::now()) {
                    self.clock_offset_estimated(frame.from, stream_token, &mut offset, ms);
                }
            }
            if self.faults.isolated.load(Ordering::Relaxed) {
                continue;
            }
            if self.node.send(Input::Raft(Box::new(msg))).is_err() {
                break Err(Status::unavailable("node is stopping"));
            }
        };
        if let Some(peer) = stamped_by {
            self.withdraw_clock_offset(peer, stream_token);
        }
        ended
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftAck>, Status> {
        self.secret.check(request.metadata(), "a snapshot")?;
        // Every build with this call names itself (see `Sender::name_in`).
        let Some((sender, open)) = self.admit(request.metadata())? else {
            return Err(Status::invalid_argument(format!(
                "{NODE_ID_HEADER}, {DATA_ID_HEADER}: a snapshot names its sender"
            )));
        };
        let mut stream = request.into_inner();
        let stopped = self.stopping.clone().raised();
        tokio::pin!(stopped);
        let mut message: Vec<u8> = Vec::new();
        let mut announced = None;
        loop {
            let chunk = tokio::select! {
                chunk = stream.message() => chunk?,
                () = &mut stopped => return Err(Status::unavailable("node is stopping")),
            };
            let Some(chunk) = chunk else {
                break;
            };
            check_sender(sender, &open, chunk.from, ("call", "chunk"))?;
            if self.faults.isolated.load(Ordering::Relaxed) {
                return Err(Status::unavailable("this node is cut off from its peers"));
            }
            let total =
                *announced.get_or_insert(usize::try_from(chunk.total).unwrap_or(usize::MAX));
            if total == 0 || total > MAX_SNAPSHOT_MESSAGE {
                return Err(Status::invalid_argument(format!(
                    "total: the first chunk must give the message's size, from 1 to \
                     {MAX_SNAPSHOT_MESSAGE} bytes, not {}",
                    chunk.total
                )));
            }
            if message.len() + chunk.data.len() > total {
                return Err(Status::invalid_argument(format!(
                    "data: more than the {total} bytes the first chunk announced"
                )));
            }
            // Grown as the data comes, not by what the first chunk claims,
            // and refused rather than aborting the process if memory runs
            // out.
            grow_within(&mut message, chunk.data.len(), total).map_err(|_| {
                Status::resource_exhausted(format!(
                    "no memory for a snapshot of {total} bytes past {}",
                    message.len()
                ))
            })?;
            message.extend_from_slice(&chunk.data);
            metrics::counter!(m::SNAPSHOT_CHUNKS_RECEIVED_TOTAL).increment(1);
        }
        let Some(total) = announced else {
            return Err(Status::invalid_argument("the call carried no chunk"));
        };
        if message.len() != total {
            return Err(Status::invalid_argument(format!(
                "data: the call ended after {} of the {total} bytes announced",
                message.len()
            )));
        }
        // Parsed from shared bytes: the snapshot's data is a slice of the
        // message received, not a second copy of it.
        let message = bytes::Bytes::from(message);
        let msg = Message::parse_from_carllerche_bytes(&message)
            .map_err(|e| Status::invalid_argument(format!("message: not a raft message: {e}")))?;
        if msg.from != sender {
            return Err(Status::invalid_argument(format!(
                "from: frame says {sender} but the message says {}",
                msg.from
            )));
        }
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument(format!(
                "message: a {:?} where a snapshot belongs",
                msg.get_msg_type()
            )));
        }
        check_sender(sender, &open, sender, ("call", "chunk"))?;
        if self.faults.isolated.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this node is cut off from its peers"));
        }
        if self.node.send(Input::Raft(Box::new(msg))).is_err() {
            return Err(Status::unavailable("node is stopping"));
        }
        Ok(Response::new(RaftAck {}))
    }
}

/// Makes room in `buf` for `more` bytes of a message of `total` bytes:
/// doubling its capacity as a `Vec` grows, but never past `total`, so the
/// last growth of a 3 GiB snapshot asks for 3 GiB, not 4.
fn grow_within(
    buf: &mut Vec<u8>,
    more: usize,
    total: usize,
) -> Result<(), std::collections::TryReserveError> {
    let needed = buf.len() + more;
    if needed <= buf.capacity() {
        return Ok(());
    }
    let want = buf
        .capacity()
        .saturating_mul(2)
        .clamp(needed, total.max(needed));
    buf.try_reserve_exact(want - buf.len())
}

#[cfg(test)]
mod tests {
    use ::raft::prelude::Snapshot;

    use super::*;
    use crate::pb::peer_server::PeerServer;

    /// A snapshot's buffer doubles as it fills but never holds more than
    /// the size announced, and ends holding exactly that.
    #[test]
    fn a_snapshot_buffer_grows_to_the_announced_size_and_no_further() {
        let total = 5_500;
        let mut buf = Vec::new();
        let mut capacities = Vec::new();
        for _ in 0..5 {
            grow_within(&mut buf, 1_000, total).unwrap();
            buf.extend_from_slice(&[7; 1_000]);
            capacities.push(buf.capacity());
        }
        grow_within(&mut buf, 500, total).unwrap();
        buf.extend_from_slice(&[7; 500]);
        capacities.push(buf.capacity());
        assert_eq!(capacities, [1_000, 2_000, 4_000, 4_000, 5_500, 5_500]);
    }

    /// The snapshot message in parts decodes as the message itself, read
    /// whole or put together from chunks that cross the parts' bounds.
    #[test]
    fn a_snapshot_encoded_in_parts_decodes_as_the_message() {
        let data: Vec<u8> = (0..300_000).map(|i| (i * 7) as u8).collect();
        let mut msg = snapshot_message(42, data);
        msg.term = 9;
        msg.commit = 40;
        let meta = msg.mut_snapshot().mut_metadata();
        meta.term = 8;
        meta.mut_conf_state().voters = vec![1, 2, 3];
        let encoded = EncodedSnapshot::of(&msg).unwrap();
        let total = encoded.len();
        assert_eq!(total, msg.write_to_bytes().unwrap().len());
        let whole = encoded.slice(0, total);
        assert_eq!(Message::parse_from_bytes(&whole).unwrap(), msg);
        let chunked: Vec<u8> = (0..total)
            .step_by(65_537)
            .flat_map(|from| encoded.slice(from, (from + 65_537).min(total)))
            .collect();
        assert_eq!(chunked, whole);
        assert_eq!(encoded.slice(total - 3, total + 10).len(), 3);
    }

    /// A peer as a build from before the `Snapshot` call is: it takes
    /// frames on the Raft stream only.
    struct OldPeer(tmpsc::UnboundedSender<RaftFrame>);

    #[tonic::async_trait]
    impl Peer for OldPeer {
        async fn raft(
            &self,
            request: Request<Streaming<RaftFrame>>,
        ) -> Result<Response<RaftAck>, Status> {
            let mut stream = request.into_inner();
            while let Some(frame) = stream.message().await? {
                let _ = self.0.send(frame);
            }
            Ok(Response::new(RaftAck {}))
        }

        async fn snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftAck>, Status> {
            // What tonic answers for a method its service does not have.
            Err(Status::unimplemented(""))
        }
    }

    /// A peer that ends every stream at once as unavailable (a node
    /// whose storage failed, or that is stopping), counting the streams.
    struct UnavailablePeer(Arc<std::sync::atomic::AtomicUsize>);

    #[tonic::async_trait]
    impl Peer for UnavailablePeer {
        async fn raft(
            &self,
            _: Request<Streaming<RaftFrame>>,
        ) -> Result<Response<RaftAck>, Status> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(Status::unavailable("node is stopping"))
        }

        async fn snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftAck>, Status> {
            Err(Status::unavailable("node is stopping"))
        }
    }

    /// A peer whose node takes a snapshot's chunks and never answers, as
    /// one installing a large state does: it says when it has the whole
    /// message, and when the call is given up.
    struct InstallingPeer(tmpsc::UnboundedSender<&'static str>);

    /// Says the call ended when tonic drops its handler.
    struct CallEnded(tmpsc::UnboundedSender<&'static str>);

    impl Drop for CallEnded {
        fn drop(&mut self) {
            let _ = self.0.send("ended");
        }
    }

    #[tonic::async_trait]
    impl Peer for InstallingPeer {
        async fn raft(
            &self,
            request: Request<Streaming<RaftFrame>>,
        ) -> Result<Response<RaftAck>, Status> {
            let mut stream = request.into_inner();
            while stream.message().await?.is_some() {}
            Ok(Response::new(RaftAck {}))
        }

        async fn snapshot(
            &self,
            request: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftAck>, Status> {
            let _ended = CallEnded(self.0.clone());
            let mut stream = request.into_inner();
            while stream.message().await?.is_some() {}
            let _ = self.0.send("whole");
            std::future::pending().await
        }
    }

    fn sender(id: u64) -> Sender {
        Sender {
            id,
            data_id: 10 + id,
            vote_promise: Duration::from_secs(1),
            layout: Layout::from_parts(&[0, 41, 10, 12]).unwrap(),
            secret: crate::service::Secret::default(),
        }
    }

    /// Serves `peer` on a loopback port; answers its address.
    async fn serve<P: Peer>(peer: P) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(peer).max_decoding_message_size(MAX_PEER_MESSAGE))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    /// Node 1's transport to node 2 at `addr`, and node 1's mailbox.
    fn transport_to(addr: String) -> (Transport, tmpsc::UnboundedReceiver<Input>) {
        let (node, inputs) = tokio::sync::mpsc::unbounded_channel();
        let transport = Transport::start(
            &tokio::runtime::Handle::current(),
            sender(1),
            &[(2, addr)],
            node,
            Arc::default(),
            Arc::new(crate::core::SystemClock::default()),
        );
        (transport, inputs)
    }

    /// A stream that ends after its replacement has estimated (a peer that
    /// reconnected) withdraws only its own estimate, not the new one.
    #[test]
    fn a_replaced_stream_withdraws_only_its_own_estimate() {
        let clocks = PeerClocks::default();
        let (old, new) = (clocks.stream(), clocks.stream());
        clocks.set(2, old, 5_000);
        clocks.set(2, new, 4_990);
        assert!(!clocks.withdraw(2, old));
        assert_eq!(clocks.all(), vec![(2, 4_990)]);
        assert!(clocks.withdraw(2, new));
        assert_eq!(clocks.all(), vec![]);
    }

    /// The estimate is the window's largest stamp-less-arrival, the frame
    /// least delayed, and comes once a window has passed; each window
    /// starts afresh, so a clock set right shows in the next one.
    #[test]
    fn a_clock_offset_is_the_least_delayed_frame_of_each_window() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut est = ClockOffset::new(t0);
        // A peer 5 s ahead; frames 3, 1 and 40 ms on the way.
        assert_eq!(est.sample(105_000, 100_003, t0 + ms(10)), None);
        assert_eq!(est.sample(105_100, 100_101, t0 + ms(500)), None);
        assert_eq!(est.sample(105_200, 100_240, t0 + ms(999)), None);
        assert_eq!(est.sample(106_000, 101_020, t0 + ms(1_000)), Some(4_999));
        // Set right: 2 s behind, the next window says so.
        assert_eq!(est.sample(99_000, 101_010, t0 + ms(1_500)), None);
        assert_eq!(est.sample(99_500, 101_502, t0 + ms(2_000)), Some(-2_002));
        // A window may hold one frame.
        assert_eq!(est.sample(102_000, 102_000, t0 + ms(3_100)), Some(0));
        // No frame for longer than CLOCK_OFFSET_STALE: withdrawn, once.
        assert!(!est.expired(t0 + ms(3_100) + CLOCK_OFFSET_STALE));
        assert!(est.expired(t0 + ms(3_101) + CLOCK_OFFSET_STALE));
        assert!(!est.expired(t0 + ms(9_000) + CLOCK_OFFSET_STALE));
        // The next window starts at the withdrawal, afresh.
        assert_eq!(est.sample(200_000, 200_010, t0 + ms(6_500)), None);
        assert_eq!(est.sample(200_000, 200_004, t0 + ms(7_200)), Some(-4));
        // A stamp no clock gives (a peer's bytes are any u64): clamped,
        // both ways, rather than overflowing.
        let mut est = ClockOffset::new(t0);
        assert_eq!(est.sample(u64::MAX, 5, t0 + ms(1_000)), Some(i64::MAX));
        assert_eq!(est.sample(1 << 63, 1, t0 + ms(2_000)), Some(i64::MAX));
        assert_eq!(est.sample(0, u64::MAX, t0 + ms(3_000)), Some(-i64::MAX));
        assert_eq!(
            est.sample(7, 1 << 63, t0 + ms(4_000)),
            Some(7 - i64::MAX - 1)
        );
    }

    /// The next snapshot report the node hears, within ten seconds.
    async fn next_report(inputs: &mut tmpsc::UnboundedReceiver<Input>) -> SnapshotReport {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match inputs.recv().await {
                    Some(Input::SnapshotSent(r)) => break r,
                    Some(_) => {}
                    None => panic!("the transport dropped the mailbox"),
                }
            }
        })
        .await
        .expect("no report on the snapshot")
    }

    /// A snapshot message with `data` at `index`, from node 1 to node 2.
    fn snapshot_message(index: u64, data: Vec<u8>) -> Message {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgSnapshot);
        msg.from = 1;
        msg.to = 2;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.set_data(data.into());
        msg.set_snapshot(snap);
        msg
    }

    /// A snapshot on its way to a peer that is then removed is given up
    /// at once, not at its deadline (a minute or more): the call ends, and
    /// the node hears it was not sent.
    #[tokio::test]
    async fn a_snapshot_to_a_removed_peer_is_given_up_and_reported() {
        let (said_tx, mut said) = tmpsc::unbounded_channel();
        let (mut transport, mut inputs) = transport_to(serve(InstallingPeer(said_tx)).await);
        transport.send(vec![snapshot_message(42, vec![7; 2 * SNAPSHOT_CHUNK])]);
        let deadline = Duration::from_secs(10);
        let heard = tokio::time::timeout(deadline, said.recv()).await;
        assert_eq!(
            heard.expect("the peer never had the snapshot"),
            Some("whole")
        );

        transport.remove_peer(2);
        let r = next_report(&mut inputs).await;
        assert_eq!((r.to, r.index, r.ok), (2, 42, false));
        let heard = tokio::time::timeout(deadline, said.recv()).await;
        assert_eq!(heard.expect("the call was kept"), Some("ended"));
    }

    /// A peer that takes connections but ends each stream at once is not
    /// asked again every 20 ms: the pause grows as for a failed connect
    /// (20, 40, 80, 160, 320 ms before the sixth stream; a backoff reset at
    /// each connect had the sixth within about 150 ms).
    #[tokio::test]
    async fn a_peer_ending_every_stream_at_once_is_retried_with_backoff() {
        let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let (transport, _inputs) = transport_to(serve(UnavailablePeer(streams.clone())).await);
        let deadline = started + Duration::from_secs(10);
        while streams.load(std::sync::atomic::Ordering::SeqCst) < 6 {
            assert!(Instant::now() < deadline, "six streams never came");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        drop(transport);
        assert!(
            took >= Duration::from_millis(620),
            "six streams in {took:?}"
        );
    }

    /// Every snapshot message is a send with a number of its own: one
    /// given up as its peer moves reports under its number, and the
    /// snapshot sent again, to the new address, has another, the newest.
    #[tokio::test]
    async fn a_snapshot_send_given_up_on_a_move_reports_under_its_own_number() {
        let (said_tx, mut said) = tmpsc::unbounded_channel();
        let old = serve(InstallingPeer(said_tx.clone())).await;
        let (mut transport, mut inputs) = transport_to(old);
        let deadline = Duration::from_secs(10);
        let whole = |heard: Result<Option<&str>, _>| heard == Ok(Some("whole"));

        transport.send(vec![snapshot_message(42, vec![7; 2 * SNAPSHOT_CHUNK])]);
        let first = transport.newest_snapshot_send(2).expect("a numbered send");
        assert!(whole(tokio::time::timeout(deadline, said.recv()).await));
        transport.add_peer(2, &serve(InstallingPeer(said_tx)).await);
        let r = next_report(&mut inputs).await;
        assert_eq!((r.index, r.send, r.ok), (42, first, false));

        transport.send(vec![snapshot_message(42, vec![7; 2 * SNAPSHOT_CHUNK])]);
        let second = transport.newest_snapshot_send(2).expect("a numbered send");
        assert_ne!(second, first);
        let heard = tokio::time::timeout(deadline, async {
            loop {
                match said.recv().await {
                    Some("ended") => {}
                    other => break other,
                }
            }
        })
        .await;
        assert!(whole(heard), "the new address never had the snapshot");
        transport.remove_peer(2);
        let r = next_report(&mut inputs).await;
        assert_eq!((r.index, r.send, r.ok), (42, second, false));
    }

    /// A snapshot that cannot go is reported as not sent, to a peer the
    /// transport has no address for (a member added without one) and from
    /// a node cut off by the fault switch: raft-rs would count it as out to
    /// that peer for ever, and send it nothing more.
    #[tokio::test]
    async fn a_snapshot_that_cannot_go_is_reported_not_sent() {
        let (mut transport, mut inputs) =
            transport_to(serve(InstallingPeer(tmpsc::unbounded_channel().0)).await);
        let mut msg = snapshot_message(42, vec![7; 10]);
        msg.to = 3;
        transport.send(vec![msg]);
        let r = next_report(&mut inputs).await;
        assert_eq!((r.to, r.index, r.ok), (3, 42, false));
        assert_eq!(transport.newest_snapshot_send(3), Some(r.send));

        transport.faults.isolated.store(true, Ordering::Relaxed);
        transport.send(vec![snapshot_message(43, vec![7; 10])]);
        let r = next_report(&mut inputs).await;
        assert_eq!((r.to, r.index, r.ok), (2, 43, false));
        assert_eq!(transport.newest_snapshot_send(2), Some(r.send));
    }

    /// A snapshot queued for a peer whose address cannot be used is
    /// reported as not sent as the peer's loop gives up.
    #[tokio::test]
    async fn a_snapshot_for_a_bad_address_is_reported_not_sent() {
        // The test's runtime runs the peer's loop only once this awaits,
        // so the snapshot is queued first.
        let (mut transport, mut inputs) = transport_to("not an address".into());
        transport.send(vec![snapshot_message(42, vec![7; 10])]);
        let r = next_report(&mut inputs).await;
        assert_eq!((r.to, r.index, r.ok), (2, 42, false));
    }

    /// A peer that cannot be reached and is then removed is no longer
    /// tried: its loop ends (one more report at most, from the attempt
    /// under way) rather than report the id unreachable for ever, which
    /// a peer added again under that id would take for its own.
    #[tokio::test]
    async fn a_removed_unreachable_peer_is_no_longer_tried() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let (mut transport, mut inputs) = transport_to(addr);
        let unreachable = |input: &Input| matches!(input, Input::Unreachable(2));
        tokio::time::timeout(Duration::from_secs(10), async {
            while !inputs.recv().await.is_some_and(|i| unreachable(&i)) {}
        })
        .await
        .expect("the peer was never reported unreachable");
        transport.remove_peer(2);
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut after = 0;
        while let Ok(Some(input)) = tokio::time::timeout_at(until, inputs.recv()).await {
            after += usize::from(unreachable(&input));
        }
        assert!(
            after <= 1,
            "reported unreachable {after} times after its removal"
        );
    }

    /// A node from before snapshots in chunks still gets one, whole, on
    /// the Raft stream, and the leader hears it was sent.
    #[tokio::test]
    async fn a_peer_without_the_snapshot_call_gets_the_snapshot_in_one_frame() {
        let (frames_tx, mut frames) = tmpsc::unbounded_channel();
        let (mut transport, mut inputs) = transport_to(serve(OldPeer(frames_tx)).await);
        let data: Vec<u8> = (0..3 * SNAPSHOT_CHUNK + 5).map(|i| i as u8).collect();
        transport.send(vec![snapshot_message(42, data.clone())]);
        let r = next_report(&mut inputs).await;
        assert_eq!(
            (r.to, r.index, r.bytes, r.ok),
            (2, 42, data.len() as u64, true)
        );
        let deadline = Duration::from_secs(10);
        let frame = tokio::time::timeout(deadline, frames.recv())
            .await
            .expect("no frame on the Raft stream")
            .unwrap();
        let got = decode_frame(&frame).unwrap();
        assert_eq!(got.get_msg_type(), MessageType::MsgSnapshot);
        assert!(
            got.get_snapshot().get_data() == &data[..],
            "the snapshot's data arrived whole"
        );
    }
}
