//! The node loop: the one task that owns `RawNode`, storage and the
//! allocator core.
//!
//! # Leadership check (I2)
//!
//! Segmented calls are answered from memory, so a deposed leader that has
//! not noticed yet could answer with stale numbers. Every call therefore
//! waits for a Raft ReadIndex round started *after* it arrived: the leader
//! asks a majority to acknowledge a heartbeat of its term, one round for all
//! calls that arrived meanwhile. If a newer leader had already answered any
//! call, a majority would already be in its newer term and the round could
//! not complete. This needs no clock assumptions, unlike a lease (which would
//! save one round trip but trusts bounded clock drift); it costs one network
//! round trip and no fsync per batch of calls.
//!
//! # Persistence
//!
//! The loop writes new entries and hard state without a sync and hands the
//! fsync to a [`Syncer`] (raft-rs's asynchronous Ready): raft-rs counts the
//! entries, and the messages that depend on them go, only once the syncer
//! reports them durable. The loop meanwhile keeps answering calls, so a slow
//! fsync delays refills and elections, not reads of warm keys.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, MessageType,
};
use ::raft::{RawNode, ReadOnlyOption, ReadState, SnapshotStatus, StateRole, Storage as _};
use prost::Message as _;
use protobuf::Message as _;
use tokio::sync::{mpsc, oneshot};

use super::read_peers::{followers_needed, ReadPeers};
use super::transport::{PeerClocks, PeerPromises, PeerService, Sender, Transport};
use super::{
    logger, Faults, Grant, HandoverProgress, HandoverStage, IdState, Input, Membership,
    MembershipChange, NodeError, NodeHandle, NodeStatus, Reply, SnapshotReport,
};
use crate::config::{RaftConfig, ReadMode, ReadRoundPeers, SnowflakeConfig};
use crate::core::{
    AllocError, Allocation, Allocator, CeilingSource, DenseRaise, ForwardStep, Mode, NamespaceId,
    Namespaces, Release, RequestId, Role, SeqKey, SeqRange,
};
use crate::metrics as m;
use crate::pb::state::{
    command, AcquireWorker, BindDataId, Command, KeyCeiling, LeaderStart, RaiseCeilings,
    ReleaseKeys, ReleasedKey, RenewFence, RequestGrant, Trim,
};
use crate::storage::identity::{Incarnation, PeerDataIds};
use crate::storage::{self, Applied, Machine, RaftStore, StorageError};

/// A log fsync that has not returned for this long means the disk is gone.
const SYNC_STALL_LIMIT: Duration = Duration::from_secs(10);
/// Most inputs handled between two Ready rounds, so ticks stay on time.
const MAX_INPUTS_PER_ROUND: usize = 4096;
/// ReadIndex rounds on the wire at once. Calls that arrive while they are
/// out wait for the next round, which starts as soon as one completes: under
/// load each round confirms many calls, and the leader's work per call (two
/// heartbeats and their answers per round) shrinks instead of growing with
/// the call rate. Two, not one: with the client keeping two batches on the
/// wire (`rpc_fill`), a batch that arrived just after a round started waited
/// for that round and then a whole one of its own; a second round in flight
/// takes it at once (three nodes: peak +10-20 %, latency lower at the same
/// rate, CPU per call the same; `bench/results/2026-12-04-read-rounds/`).
const MAX_READ_ROUNDS: usize = 2;
/// A learner is promoted only within this many entries of the leader's
/// log: further behind, it could not acknowledge new entries until it
/// caught up, and with it in the quorum nothing would commit meanwhile.
const PROMOTE_LAG: u64 = 1_000;
/// Share of a follower's promise a completed read round leases (read_mode =
/// "lease"), as a fraction. The promise is shorter than the election timeout
/// by two ticks: a late loop iteration can count a tick just after the
/// heartbeat that reset the count, and the next one comes on schedule, so E
/// ticks can pass in E - 2 tick lengths. The fraction is the margin for
/// monotonic clocks running at slightly different rates.
const LEASE_NUM: u32 = 4;
const LEASE_DEN: u32 = 5;
/// Idempotency records a node keeps (per table; the applied ones are also
/// what the state machine stores): at most this many ...
const RECENT_REQUESTS: usize = storage::REQUEST_RECORDS;
/// ... holding at most this many ranges in all (a batch's record holds one
/// per item; 16 bytes each in memory).
const RECENT_RANGES: usize = storage::REQUEST_RECORD_RANGES;
/// Keys the idle sweep looks at per tick: a whole pass over 10 million keys
/// takes 1,000 ticks, and each tick spends about 40 µs on it
/// (`cargo bench --bench memory`).
const IDLE_SWEEP_PER_TICK: usize = 10_000;

/// Keys in one part of a hand-over's trim. A part is an entry of about
/// half a megabyte (a key's namespace, name and ceiling), one append
/// message at the default `max_size_per_msg`. In one entry, a leader's
/// million keys held its loop 1.3 s in the debug build (another node took
/// over before the transfer), and DESIGN's ten million made an entry of
/// about 300 MB.
const TRIM_PART_KEYS: usize = 10_000;

/// A leader about to hand over first releases, while it still serves, the
/// keys not used for this long (a key released continues without a hole
/// when next used, as after an idle release): the trim that follows,
/// during which it serves nothing, is then of the keys in use only. (Its
/// million keys took the trim of a three-node release cluster on this
/// VM 11-13 s, `bench/handover.sh`: callers saw no answer meanwhile.)
const HANDOVER_IDLE_MS: u64 = 1_000;

/// Keys a handover's release phase looks at a time, and so at most in one
/// release entry: the loop applies each entry while it serves, and a key's
/// release reads and writes its stored ceiling (10,000 keys took a
/// release cluster's loop on this VM about 0.4 s, with a million keys
/// stored).
const HANDOVER_RELEASE_KEYS: usize = 1_000;

/// Keys a handover's release phase looks at before it releases the idle
/// ones among them in key order, [`HANDOVER_RELEASE_KEYS`] an entry. A
/// release reads and writes each key's stored ceiling; with its keys close
/// together in the state family, each read and write finds most of its
/// search path (the memtable's skiplist, the tables' index and data
/// blocks) where the one before left it. Taken in the allocator's order
/// (the order keys were first used), a million keys took a three-node
/// release cluster on session 28's 2-core VM 37-40 s; in windows of
/// 300,000 keys, 24-25 s (runs in alternation, `bench/handover.sh`,
/// `bench/results/2026-12-06-session28-handover-order/`). The whole map
/// sorted at once did little better and held the loop 0.3 s. A window
/// holds ~40 bytes a key.
const HANDOVER_RELEASE_WINDOW: usize = 300_000;

/// Keys of a window looked at, and their idle ones sorted, in one loop
/// round: a few milliseconds of the release build's loop. (A whole window
/// at once made the slowest call during `tests/snapshot.rs`'s handover
/// 0.3-0.5 s in the debug build, against 0.17 s.)
const HANDOVER_RELEASE_CHUNK: usize = 20_000;

/// Idle keys a handover's release phase found and has not yet released:
/// sorted runs, one per loop round of looking, merged as they are taken.
#[derive(Default)]
struct ReleaseWindow {
    /// Each run in reverse key order, so that its first key is its last.
    runs: Vec<Vec<SeqKey>>,
    /// Keys looked at for this window.
    looked: usize,
    /// Done looking: its keys are being released.
    full: bool,
    /// The longest round of looking and sorting.
    slowest: Duration,
}

impl ReleaseWindow {
    /// Adds the keys of one round of looking.
    fn add_run(&mut self, mut keys: Vec<SeqKey>, looked: usize) {
        keys.sort_unstable_by(|a, b| b.cmp(a));
        if !keys.is_empty() {
            self.runs.push(keys);
        }
        self.looked += looked;
    }

    /// Up to `n` of its keys, the first in key order among all its runs.
    fn take(&mut self, n: usize) -> Vec<SeqKey> {
        let mut out = Vec::with_capacity(n.min(self.len()));
        while out.len() < n {
            let first = self
                .runs
                .iter()
                .enumerate()
                .filter_map(|(i, run)| Some((i, run.last()?)))
                .min_by(|a, b| a.1.cmp(b.1))
                .map(|(i, _)| i);
            let Some(key) = first.and_then(|i| self.runs[i].pop()) else {
                break;
            };
            out.push(key);
        }
        self.runs.retain(|run| !run.is_empty());
        out
    }

    fn len(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }
}

/// Bytes of keys in one part of a trim, at most (a part of long keys holds
/// fewer than [`TRIM_PART_KEYS`]).
const TRIM_PART_BYTES: usize = 512 * 1024;

/// A key's bytes in a trim entry besides its name: its namespace's name,
/// its ceiling and the encoding's tags and lengths, about.
const KEY_CEILING_OVERHEAD: usize = 24;

/// Parts of a trim proposed and not yet applied: enough for the next part
/// to be in the log while one commits, few enough that a loop round
/// encodes at most a few megabytes of them.
const TRIM_PARTS_IN_FLIGHT: usize = 4;

/// Committed entry bytes the node loop applies on its own worker thread;
/// a longer apply (a follower catching up) leaves the thread to the
/// runtime's other tasks meanwhile (see [`apply_leaves_loop`]). A dense
/// round's raise is about 40 bytes per key.
const INLINE_APPLY_BYTES: usize = 64 * 1024;

/// Where the next part of a trim starts in `untrimmed` (parts are taken
/// from the end): at most `max_keys` keys, and no more once their names
/// reach `max_bytes` (keys may be up to `max_key_bytes` long). Never
/// empty while keys are left.
fn next_part(untrimmed: &[DenseRaise], max_keys: usize, max_bytes: usize) -> usize {
    let mut from = untrimmed.len();
    let mut bytes = 0;
    while from > 0 && untrimmed.len() - from < max_keys && bytes < max_bytes {
        from -= 1;
        bytes += untrimmed[from].key.key().len() + KEY_CEILING_OVERHEAD;
    }
    from
}

/// Whether applying `entries` should leave the node loop's worker thread
/// to the runtime's other tasks: a long batch (a follower catching up, a
/// trim of every key) would hold them; a configuration change is rare, and
/// handing the worker off for it costs nothing that matters (it is written
/// as any apply is, in one unsynced batch with the applied index, a lost
/// one applied again from the synced log). A short apply of normal
/// entries writes the state unsynced (the log it comes from is durable),
/// a memtable insert and a page-cache append that the loop does itself:
/// handing the worker to another thread for it cost more than the write
/// (a dense namespace applies an entry every round: −14 % CPU per call,
/// +5-10 % calls/s). So does the log compaction an apply may start, which
/// is not synced either ([`RaftStore::compact`]).
fn apply_leaves_loop(entries: &[Entry]) -> bool {
    let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
    bytes > INLINE_APPLY_BYTES
        || entries
            .iter()
            .any(|e| e.get_entry_type() != EntryType::EntryNormal)
}

/// Entries the log keeps at most past a snapshot a follower has not
/// reached yet (or ten compaction thresholds, if more): a few MiB, for a
/// few seconds of a snapshot's transfer and install under load.
const SNAPSHOT_HOLD_MAX_ENTRIES: u64 = 100_000;
/// How long a follower a snapshot was sent to may take to install it and
/// answer (it does not answer meanwhile, so raft-rs soon counts it as not
/// recently active): a minute, or a second per MiB of snapshot if longer.
/// Session 31's VM installed 652 MB (28 million keys) in 66-122 s in one
/// write; through a table file (session 32), 8-11 s. The margin covers a
/// slow disk and the debug build.
fn snapshot_install_grace(bytes: u64) -> Duration {
    Duration::from_secs(60).max(Duration::from_secs(bytes >> 20))
}

/// Whether the log, applied up to `applied` and compacted up to
/// `compacted`, is long enough to compact (see `Node::maybe_compact`).
fn compaction_due(applied: u64, compacted: u64, compact_threshold: u64) -> bool {
    applied.saturating_sub(compacted) > compact_threshold
}

/// What [`spawn`] needs.
pub struct NodeParams {
    pub id: u64,
    /// Initial voters (used only for a fresh data directory).
    pub voters: Vec<u64>,
    /// Every peer's id and address.
    pub peers: Vec<(u64, String)>,
    /// Kept current with every member's address, for the services' leader
    /// hints.
    pub addrs: super::PeerAddrs,
    pub data_dir: PathBuf,
    pub raft: RaftConfig,
    pub namespaces: Namespaces,
    /// Start with no configuration and wait to be added.
    pub join: bool,
    pub snowflake: SnowflakeConfig,
    pub ids: Arc<IdState>,
    pub faults: Arc<Faults>,
    /// This incarnation's id, carried by its fence renewals (random).
    pub boot: u64,
    /// The cluster's shared secret, named on the peer streams it opens
    /// and required on those it takes.
    pub secret: crate::service::Secret,
    pub testing: NodeTesting,
}

/// Switches for the deterministic simulation; all off in a real node.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeTesting {
    /// Elect after exactly `election_ticks` (raft-rs would draw from its
    /// thread RNG); the simulation randomises tick timing instead.
    pub fixed_election_timeout: bool,
    /// Answer calls without the ReadIndex round: a deliberately broken
    /// leadership check, to show the simulation catches I2 violations.
    pub skip_leadership_check: bool,
    /// Lease mode with a lease three election timeouts long, outliving the
    /// followers' promise: a deliberately broken lease.
    pub stretch_lease: bool,
    /// Keys per part of a hand-over's trim; 0: `TRIM_PART_KEYS`. (The
    /// simulation has a few keys, and trims them one per part.)
    pub trim_part_keys: usize,
    /// How long unused a key is released before a handover; 0:
    /// `HANDOVER_IDLE_MS`. (The simulation's keys leave memory after
    /// 300 ms idle anyway.)
    pub handover_idle_ms: u64,
    /// Exit inside the next snapshot install through a table file (see
    /// `config::TestingConfig::stop_in_snapshot_install`).
    pub stop_in_snapshot_install: Option<crate::config::InstallStep>,
}

/// Where a node's Raft messages go: the gRPC transport, or the simulated
/// network.
pub(crate) trait Outbox: Send {
    /// Sends `msgs`, numbering each snapshot among them as a new send to
    /// its peer, which its report names (see [`SnapshotReport::send`]).
    fn send(&mut self, msgs: Vec<::raft::prelude::Message>);
    fn add_peer(&mut self, id: u64, addr: &str);
    fn remove_peer(&mut self, id: u64);
    /// The number of the newest snapshot send to `to`.
    fn newest_snapshot_send(&self, to: u64) -> Option<u64>;
}

impl Outbox for Transport {
    fn send(&mut self, msgs: Vec<::raft::prelude::Message>) {
        Transport::send(self, msgs)
    }

    fn newest_snapshot_send(&self, to: u64) -> Option<u64> {
        Transport::newest_snapshot_send(self, to)
    }

    fn add_peer(&mut self, id: u64, addr: &str) {
        Transport::add_peer(self, id, addr)
    }

    fn remove_peer(&mut self, id: u64) {
        Transport::remove_peer(self, id)
    }
}

/// Makes a node's log durable off its loop: a thread that fsyncs the
/// write-ahead log, or the simulation at a virtual time of its choosing.
/// Either answers `request(n)` with [`Input::Persisted`] carrying `n` (or a
/// later request's number) once every write made before the request is
/// durable.
pub(crate) trait Syncer: Send {
    fn request(&mut self, number: u64);
}

/// The real [`Syncer`]: requests go to a thread of their own, since an
/// fsync blocks (for 1-50 ms on some disks, seen here).
struct WalSyncer {
    requests: Option<std::sync::mpsc::Sender<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Disconnected once the thread has let go of the database.
    released: std::sync::mpsc::Receiver<()>,
}

impl Syncer for WalSyncer {
    fn request(&mut self, number: u64) {
        if let Some(requests) = &self.requests {
            // The thread stops only once this syncer is dropped.
            let _ = requests.send(number);
        }
    }
}

impl Drop for WalSyncer {
    /// Stops the thread and waits for it (one fsync, normally), so that its
    /// handle on the database is gone before the node's: the database then
    /// closes with the node, not on this thread while the process exits
    /// (RocksDB's shutdown racing the C++ runtime's teardown crashed the
    /// thread on exit, after a clean stop, with SIGSEGV).
    /// A disk whose fsync never returns must not hang the stop for good:
    /// after [`SYNC_STALL_LIMIT`] the thread is left behind (and the exit
    /// may then crash as before, on a node already stopped).
    fn drop(&mut self) {
        self.requests = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        match self.released.recv_timeout(SYNC_STALL_LIMIT) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                limit = ?SYNC_STALL_LIMIT,
                "the Raft log's sync thread has not returned; stopping without it"
            ),
            _ => {
                let _ = thread.join();
            }
        }
    }
}

impl WalSyncer {
    fn start(
        id: u64,
        disk: storage::Disk,
        mailbox: &super::Mailbox,
        faults: Arc<super::Faults>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        // Weak: the node's loop ends when the last handle to it goes, and
        // this thread must not keep it alive.
        let mailbox = mailbox.downgrade();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("raft-sync-{id}"))
            .spawn(move || {
                while let Ok(mut number) = rx.recv() {
                    // Requests that queued during the last fsync share the next.
                    while let Ok(n) = rx.try_recv() {
                        number = number.max(n);
                    }
                    let started = Instant::now();
                    let delay = faults.sync_delay_ms.load(std::sync::atomic::Ordering::Relaxed);
                    if delay > 0 {
                        std::thread::sleep(Duration::from_millis(delay));
                    }
                    if let Err(e) = disk.sync_wal() {
                        tracing::error!(node_id = id, error = %e, "cannot sync the Raft log; stopping the node");
                        std::process::exit(70);
                    }
                    metrics::histogram!(m::RAFT_SYNC_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    let Some(mailbox) = mailbox.upgrade() else {
                        break;
                    };
                    if mailbox.send(Input::Persisted(number)).is_err() {
                        break;
                    }
                }
                drop(disk);
                drop(release);
            })?;
        Ok(Self {
            requests: Some(tx),
            thread: Some(thread),
            released,
        })
    }
}

/// The node's sense of time: the machine's monotonic clock, or the
/// simulation's virtual one.
#[derive(Clone)]
pub enum NodeTime {
    Real,
    Virtual(Arc<VirtualTime>),
}

/// Virtual time: a fixed origin plus milliseconds advanced by the driver.
#[derive(Debug)]
pub struct VirtualTime {
    origin: Instant,
    ms: std::sync::atomic::AtomicU64,
}

impl VirtualTime {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn ms(&self) -> u64 {
        self.ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_ms(&self, ms: u64) {
        self.ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn instant(&self) -> Instant {
        self.origin + Duration::from_millis(self.ms())
    }
}

impl Default for VirtualTime {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeTime {
    pub fn now(&self) -> Instant {
        match self {
            NodeTime::Real => Instant::now(),
            NodeTime::Virtual(v) => v.instant(),
        }
    }
}

/// How long this node's time must stay past the cluster's before it is
/// logged and shown (see `Node::report_ahead_of_cluster`): a node catching
/// up on the log applies the others' renewals late, and its right clock
/// reads as past them until it has caught up.
const AHEAD_REPORTED_AFTER: Duration = Duration::from_secs(10);

/// How long this node refuses to vote for another after hearing from a
/// leader: an election timeout, less two ticks (a late loop iteration can
/// count a tick just after the heartbeat that reset the count). Leases rest
/// on it, and the peer streams name it.
fn vote_promise(raft: &RaftConfig) -> Duration {
    Duration::from_millis(raft.tick_ms) * (raft.election_ticks.saturating_sub(2) as u32)
}

/// Opens storage, starts the node's loop and the peer transport on `rt`
/// (a multi-thread runtime: the loop hands its worker off while it waits
/// for the disk, see `Node::blocking`).
pub fn spawn(
    params: NodeParams,
    rt: &tokio::runtime::Handle,
) -> Result<(NodeHandle, PeerService, tokio::task::JoinHandle<()>), StorageError> {
    let disk = storage::open(&params.data_dir)?;
    let data_id = storage::identity::own(&disk)?;
    let layout = *params.ids.lock().layout();
    let clock = params.ids.clock.clone();
    storage::check_layout(&disk, &layout)?;
    storage::check_node_id(&disk, params.id)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let faults = params.faults.clone();
    let request_timeout = Duration::from_millis(params.raft.request_timeout_ms);
    let id = params.id;
    let transport_tx = tx.clone();
    let promise = vote_promise(&params.raft);
    let secret = params.secret;
    let syncer = WalSyncer::start(id, disk.clone(), &tx, faults.clone())
        .map_err(|e| StorageError::corrupt("raft sync thread", e))?;
    let mut node = Node::open(
        params,
        disk,
        data_id,
        NodeTime::Real,
        rx,
        |peers| {
            Box::new(Transport::start(
                rt,
                Sender {
                    id,
                    data_id,
                    vote_promise: promise,
                    layout,
                    secret,
                },
                peers,
                transport_tx,
                faults.clone(),
                clock.clone(),
            ))
        },
        Box::new(syncer),
    )?;
    node.raw.mut_store().build_snapshots_in_background();
    let data_ids = node.peer_data_ids.clone();
    let promises = node.peer_promises.clone();
    let clocks = node.peer_clocks.clone();
    let task = rt.spawn(node.run());
    Ok((
        NodeHandle::new(tx.clone(), request_timeout),
        PeerService::new(tx, faults, data_ids, promises, layout, clock, clocks)
            .require_secret(secret),
        task,
    ))
}

/// A client call inside the node.
enum Call {
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
}

impl Call {
    fn deadline(&self) -> Instant {
        match self {
            Call::Allocate { deadline, .. } | Call::Current { deadline, .. } => *deadline,
        }
    }

    fn fail(self, err: NodeError) {
        match self {
            Call::Allocate { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Call::Current { reply, .. } => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

/// A dense call whose numbers are reserved, answered when its raise applies.
struct DenseWaiter {
    reply: Reply<Grant>,
    ranges: Vec<SeqRange>,
    /// The call's request id and a hash of its items.
    request: Option<(RequestKey, u64)>,
}

/// A request id within its namespace.
type RequestKey = (NamespaceId, RequestId);

/// A hash of a call's items: a retry must ask for the same keys and counts
/// (in the same order) to get the first call's ranges. FNV-1a over each
/// key's length, bytes and count: it goes into the log (dense calls), so
/// every node, whatever its build, must compute the same.
fn items_hash(items: &[(SeqKey, u32)]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    for (key, count) in items {
        let bytes = key.key_bytes();
        eat(&(bytes.len() as u64).to_le_bytes());
        eat(bytes);
        eat(&count.to_le_bytes());
    }
    h
}

/// A dense call with a request id whose raise has not committed yet, and
/// the retries of it that arrived meanwhile: they get its answer, so a retry
/// never reserves a second range (which would leave a hole in a gap-free
/// namespace once the first commits).
struct PendingRequest {
    items: u64,
    retries: Vec<Reply<Grant>>,
}

enum Proposal {
    Raises(Vec<DenseWaiter>),
    LeaderStart,
    /// A part of handover `handover`'s trim; `last`: the part that makes
    /// the hand-off clean.
    Trim {
        last: bool,
        handover: u64,
    },
    /// Idle keys leaving memory; they serve again once this settles.
    Release(Vec<SeqKey>),
    ConfChange(Reply<Membership>),
}

enum HandoverPhase {
    /// Still serving, releasing keys idle for [`HANDOVER_IDLE_MS`], a window
    /// of the keys at a time with one release entry in flight: `looked`
    /// keys looked at, of the `of` held when the handover began.
    Releasing {
        looked: usize,
        of: usize,
        in_flight: Option<u64>,
        /// Idle keys found and not yet released (see
        /// [`HANDOVER_RELEASE_WINDOW`]).
        window: ReleaseWindow,
    },
    Trimming,
    /// `trimmed`: the trim applied, so every entry proposed before it has
    /// too. Otherwise raft-rs dropped it, and raises proposed before it (a
    /// dense call's reservation among them) may still commit.
    Transferring {
        trimmed: bool,
    },
}

/// A leader handing over: release, trim, transfer, then maybe stop.
struct Handover {
    /// This node's count of handovers begun: parts of an earlier one's
    /// trim that apply during this one are not this one's.
    id: u64,
    /// The term whose leadership is being handed over.
    term: u64,
    to: Option<u64>,
    phase: HandoverPhase,
    started: Instant,
    /// Keys held when it began.
    keys_at_start: usize,
    /// Idle keys proposed for release.
    released: usize,
    /// Keys the trim covers (0 before it begins).
    trim_keys: usize,
    /// Moved on as each release entry is proposed and each part of the
    /// trim applies, so a long handover is not cut short while it
    /// progresses.
    deadline: Instant,
    reply: Option<Reply<()>>,
    exit: Option<oneshot::Sender<()>>,
    /// Keys whose trim is not proposed yet (taken from the end, a part at
    /// a time).
    untrimmed: Vec<DenseRaise>,
    /// Parts proposed and not applied yet.
    parts_in_flight: usize,
    /// The last part is proposed.
    last_part_proposed: bool,
}

/// Idempotency records: what each request id was answered with (a hash of
/// its items, and its ranges). Kept in two generations: records go into the
/// young one, and once it holds half the bounds ([`RECENT_REQUESTS`],
/// [`RECENT_RANGES`]) the old one is dropped and the young one becomes old,
/// so between half and all of the bounds' newest records are kept. Each
/// generation's table is sized for its half when it takes its first record
/// and never has one removed, so it never rehashes: a table of this size
/// growing, or rehashing away the tombstones of one-by-one evictions, held
/// the node loop (and every call) for 6-17 ms at a time.
#[derive(Default)]
struct RecentRequests {
    young: RequestGeneration,
    old: RequestGeneration,
    /// Hashes the items of the calls recorded here (see
    /// [`RecentRequests::items_hash`]).
    hasher: foldhash::quality::RandomState,
}

/// What a request id got: its items' hash, its ranges, and the epoch they
/// were allocated in (0: unknown, a record from an older build).
type RequestRecord = (u64, Vec<SeqRange>, u64);

#[derive(Default)]
struct RequestGeneration {
    map: HashMap<RequestKey, RequestRecord>,
    /// Ranges held in `map`.
    ranges: usize,
    /// When it took its first record.
    since: Option<Instant>,
}

impl RecentRequests {
    /// The hash these records hold of a call's items. They never leave this
    /// leader's memory, so any hash of this process does: foldhash reads a
    /// key a word at a time where [`items_hash`] (FNV-1a, which the log's
    /// records need) multiplies once per byte, about 7 % of a node's CPU
    /// under 50-key batches.
    fn items_hash(&self, items: &[(SeqKey, u32)]) -> u64 {
        self.hasher.hash_one(items)
    }

    fn get(&self, key: &RequestKey) -> Option<&RequestRecord> {
        self.young.map.get(key).or_else(|| self.old.map.get(key))
    }

    /// Records what request `key` got, at `now`. When that drops the old
    /// generation, returns how long its newest records had been kept: a
    /// retry that reaches this leader later than that after its first
    /// attempt gets new numbers, not the first attempt's.
    fn insert(
        &mut self,
        key: RequestKey,
        items: u64,
        ranges: Vec<SeqRange>,
        epoch: u64,
        now: Instant,
    ) -> Option<Duration> {
        let young = &self.young;
        let mut kept = None;
        if !young.map.is_empty()
            && (young.map.len() >= RECENT_REQUESTS / 2
                || young.ranges + ranges.len() > RECENT_RANGES / 2)
        {
            kept = young
                .since
                .map(|since| now.saturating_duration_since(since));
            let old = std::mem::replace(&mut self.old, std::mem::take(&mut self.young));
            drop_aside(old);
        }
        let young = &mut self.young;
        if young.map.capacity() == 0 {
            young.map.reserve(RECENT_REQUESTS / 2);
        }
        young.since.get_or_insert(now);
        young.ranges += ranges.len();
        if let Some((_, replaced, _)) = young.map.insert(key, (items, ranges, epoch)) {
            young.ranges -= replaced.len();
        }
        kept
    }

    fn clear(&mut self) {
        let RecentRequests { young, old, .. } = std::mem::take(self);
        drop_aside(young);
        drop_aside(old);
    }
}

/// Drops a generation of records, on a thread of its own if it holds any:
/// freeing tens of thousands of them takes milliseconds that the node loop
/// should spend answering calls.
fn drop_aside(generation: RequestGeneration) {
    if generation.map.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("seqd-drop".into())
        .spawn(move || drop(generation));
    // A failed spawn drops the records here, with the closure.
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no thread to drop records on; dropped inline");
    }
}

/// The state machine seen through the allocator's eyes.
struct Source<'a> {
    machine: &'a Machine,
    namespaces: &'a Namespaces,
}

impl CeilingSource for Source<'_> {
    fn committed_ceiling(&self, key: &SeqKey) -> u64 {
        let ns = &self.namespaces.spec(key.namespace()).name;
        match self.machine.ceiling(ns, key.key()) {
            Ok(c) => c,
            // Fail-stop: a node that cannot read its own state must not guess;
            // the process restarts and another node serves meanwhile.
            Err(e) => panic!("state machine unreadable: {e}"),
        }
    }
}

pub(crate) struct Node {
    id: u64,
    raw: RawNode<RaftStore>,
    machine: Machine,
    core: Allocator,
    /// The allocator's namespaces, kept beside it so state reads can borrow
    /// them while the allocator is borrowed mutably.
    namespaces: Namespaces,
    transport: Box<dyn Outbox>,
    syncer: Box<dyn Syncer>,
    /// The newest Ready whose writes wait for the syncer, if any.
    sync_pending: Option<u64>,
    /// Since when a sync has been pending.
    sync_since: Option<Instant>,
    /// Messages that may go only once the log is synced up to that Ready
    /// (a follower's acknowledgements, a candidate's vote requests), oldest
    /// first.
    held: VecDeque<(u64, Vec<::raft::prelude::Message>)>,
    inbox: mpsc::UnboundedReceiver<Input>,
    time: NodeTime,
    tick: Duration,
    election_timeout: Duration,
    /// How long a call may wait for the cluster (its deadline).
    request_timeout: Duration,
    compact_threshold: u64,
    started: Instant,
    /// Until when this node refuses every vote after starting (see
    /// [`Node::refuses_vote`]).
    refuse_votes_until: Instant,
    /// This node's vote promise, while the one its directory records (an
    /// earlier run's, which leases may still rest on) is longer: recorded
    /// once `refuse_votes_until` has passed.
    promise_to_record: Option<Duration>,
    disk: storage::Disk,
    /// Calls waiting for the next ReadIndex round.
    unconfirmed: Vec<Call>,
    /// ReadIndex rounds in flight, oldest first: context, start, calls.
    reads: VecDeque<(u64, Instant, Vec<Call>)>,
    /// Which followers read rounds go to (None: all of them).
    read_peers: Option<ReadPeers>,
    /// Lease length when read_mode = "lease".
    lease: Option<Duration>,
    /// Until when this leadership may answer without a round (lease mode).
    lease_until: Option<Instant>,
    /// A term in which this node asked raft-rs to transfer leadership: the
    /// target may campaign any time later in it (a transfer's votes ignore
    /// leases), even after the handover gave up, so no lease in that term.
    lease_forbidden_term: u64,
    /// Confirmed calls waiting for a refill to apply.
    waiting: Vec<Call>,
    /// Dense reservations for the next proposal.
    dense_pending: Vec<DenseWaiter>,
    /// When (`now_ms`) raises last went to the log.
    raises_sent_ms: Option<u64>,
    /// Refills no call waits for go to the log at most this often,
    /// together (`raft.refill_batch_ms`; see
    /// [`Allocator::refill_urgent`] for those that go at once). Under load
    /// keys cross their half-segment marks one by one: a proposal per
    /// pass put an entry (a synced write on every node, a replication
    /// round) in the log for every one or two keys.
    refill_batch_ms: u64,
    /// Our proposals in flight: log index → (term, what).
    proposals: BTreeMap<u64, (u64, Proposal)>,
    /// Index of this leadership's LeaderStart entry, once proposed.
    leader_start: Option<u64>,
    next_ctx: u64,
    /// What calls with a request id this leadership answered from memory
    /// (segmented namespaces); forgotten when the allocator's memory is.
    recent: RecentRequests,
    /// What dense calls with a request id got, recorded by every node from
    /// the raises it applies and loaded at start from the state machine's
    /// records, so a new (or restarted) leader answers a retry as the old
    /// one would have.
    applied_requests: RecentRequests,
    /// Dense calls with a request id waiting for their raise to commit.
    pending_requests: HashMap<RequestKey, PendingRequest>,
    handover: Option<Handover>,
    /// Handovers begun (each one's id).
    handovers_begun: u64,
    last_leader: u64,
    pub(crate) snapshots_installed: u64,
    /// Worker ids the layout allows (set at start).
    max_workers: u64,
    ids: Arc<IdState>,
    snowflake: SnowflakeConfig,
    /// This incarnation's id, carried by its fence renewals.
    boot: u64,
    acquire_sent: Option<Instant>,
    renew_sent: Option<Instant>,
    /// Since when this node's time has been past the cluster's (see
    /// `Issuer::ahead_of_cluster`), and whether that was reported.
    ahead_of_cluster: Option<(Instant, bool)>,
    /// How far past, at the last tick (0: not past).
    ahead_of_cluster_ms: u64,
    skip_leadership_check: bool,
    /// Idle keys this node released from memory while leading (the
    /// simulation reports it, to show releases happen under its faults).
    pub(crate) keys_released: u64,
    /// Read rounds this node sent (the simulation compares them with the
    /// heartbeats that carried them).
    pub(crate) read_rounds_sent: u64,
    /// Read rounds it sent to every follower again (a chosen one answered
    /// slowly or became unreachable).
    pub(crate) read_resends: u64,
    /// Parts of hand-over trims this node proposed (the simulation's tests
    /// check that a trim of more keys than a part went in parts).
    pub(crate) trim_parts: u64,
    /// Keys per part of a hand-over's trim.
    trim_part_keys: usize,
    /// Keys unused this long are released before a handover's trim.
    handover_idle_ms: u64,
    /// Set by `run`: the node runs as a task on a multi-thread runtime.
    on_runtime: bool,
    /// Shared with the peer service, which admits streams by them; told
    /// the members whenever the configuration changes.
    peer_data_ids: Arc<PeerDataIds>,
    /// This node's data directory id (0 in the simulation: never bound).
    data_id: u64,
    /// When the leader last proposed a binding for each member.
    bind_sent: HashMap<u64, Instant>,
    /// When a Raft message for another node was last logged.
    misdirected_logged: Option<Instant>,
    /// When each peer last answered this node's appends or heartbeats in
    /// the current term (membership changes count on the voters that
    /// answer).
    last_heard: HashMap<u64, Instant>,
    /// Followers sent the snapshot for followers: its index, and until
    /// when they may be installing it.
    snapshot_sent: HashMap<u64, (u64, Instant)>,
    addrs: super::PeerAddrs,
    /// Vote promises peers named on their streams (lease mode).
    peer_promises: PeerPromises,
    /// Each peer's clock offset, as the peer service estimates it.
    peer_clocks: PeerClocks,
    /// The tenure of this node's worker id as this node knows it: a
    /// snapshot naming another holding means the id was released and held
    /// by others meanwhile (see `finish_ready`).
    worker_tenure: Option<u64>,
    /// Whether some member's data id is not bound yet (so `bind_tick`
    /// reads nothing once all are).
    some_unbound: bool,
}

/// The configuration raft-rs made of conf-change entry `e`, or `None`
/// (logged) if it refused the change.
fn taken(e: &Entry, outcome: Result<ConfState, ::raft::Error>) -> Option<ConfState> {
    outcome
        .map_err(|err| tracing::warn!(error = %err, index = e.index, "conf change rejected"))
        .ok()
}

fn command_kind(cmd: &Command) -> &'static str {
    match cmd.kind {
        Some(command::Kind::Raise(_)) => "raise",
        Some(command::Kind::LeaderStart(_)) => "leader_start",
        Some(command::Kind::Trim(_)) => "trim",
        Some(command::Kind::AcquireWorker(_)) => "acquire_worker",
        Some(command::Kind::RenewFence(_)) => "renew_fence",
        Some(command::Kind::Release(_)) => "release",
        Some(command::Kind::BindDataId(_)) => "bind_data_id",
        None => "none",
    }
}

impl Node {
    /// Builds a node over an opened disk. `outbox` gets every peer's id and
    /// address (configured ones completed by recorded membership).
    pub(crate) fn open(
        params: NodeParams,
        disk: storage::Disk,
        data_id: u64,
        time: NodeTime,
        inbox: mpsc::UnboundedReceiver<Input>,
        outbox: impl FnOnce(&[(u64, String)]) -> Box<dyn Outbox>,
        syncer: Box<dyn Syncer>,
    ) -> Result<Node, StorageError> {
        let voters = if params.join {
            Vec::new()
        } else {
            params.voters.clone()
        };
        let peer_data_ids = Arc::new(PeerDataIds::open(disk.clone())?);
        let promise = vote_promise(&params.raft);
        let recorded_promise = storage::recorded_vote_promise(&disk)?;
        // Recorded before any peer stream names it: a lease may rest on it
        // from the first acknowledgement. Only a shorter promise waits
        // (see `record_promise_tick`).
        let promise_to_record = match recorded_promise {
            Some(recorded) if promise < recorded => Some(promise),
            Some(recorded) if promise == recorded => None,
            _ => {
                storage::record_vote_promise(&disk, promise)?;
                None
            }
        };
        let meta_disk = disk.clone();
        let mut store = RaftStore::open(disk.clone(), &voters)?;
        store.stop_in_install(params.testing.stop_in_snapshot_install);
        let machine = Machine::open(disk)?;
        let store_compacted = store.compacted_index();
        // Entries are applied before the hard state announcing their commit
        // is written; after a crash in between, applied may exceed the stored
        // commit, which raft-rs refuses. Those entries were committed.
        store.ensure_commit(machine.applied())?;
        let worker_tenure = match machine.worker_of(params.id)? {
            Some((worker, fence)) => {
                params.ids.lock().assign_worker(worker, fence);
                Some(machine.holding(worker)?.0)
            }
            None => None,
        };
        if let Some(fence) = machine.latest_fence_of_others(params.id)? {
            let mono = params.ids.clock.mono_ms();
            params.ids.lock().stored_cluster_fence(fence, mono);
        }
        // Addresses recorded by membership changes complete the configured
        // ones, and replace them: a member removed and added back (a
        // replacement host) is recorded at its new address, while every
        // other node's file may still name the old one. Founders have no
        // record and keep the configured address.
        let mut peers = params.peers.clone();
        for (id, addr) in machine.members()? {
            match peers.iter_mut().find(|(p, _)| *p == id) {
                Some((_, configured)) if *configured != addr => {
                    tracing::warn!(
                        node_id = params.id,
                        peer_id = id,
                        configured = %configured,
                        recorded = %addr,
                        "peer address in the configuration differs from the one its \
                         membership change recorded; using the recorded one"
                    );
                    *configured = addr;
                }
                Some(_) => {}
                None => peers.push((id, addr)),
            }
        }
        for (id, addr) in &peers {
            params.addrs.set(*id, addr);
        }
        let mut cfg = ::raft::Config {
            id: params.id,
            election_tick: params.raft.election_ticks,
            heartbeat_tick: params.raft.heartbeat_ticks,
            // The bootstrap index is "applied" without a state-machine write.
            applied: machine.applied().max(store_compacted),
            max_size_per_msg: params.raft.max_size_per_msg,
            max_inflight_msgs: params.raft.max_inflight_msgs,
            // A leader cut off from the majority steps down after an election
            // timeout, which fails its waiting calls instead of leaving them.
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            ..Default::default()
        };
        if params.testing.fixed_election_timeout {
            cfg.min_election_tick = params.raft.election_ticks;
            cfg.max_election_tick = params.raft.election_ticks + 1;
        }
        cfg.validate()
            .map_err(|e| StorageError::corrupt("raft config", e))?;
        let raw = RawNode::new(&cfg, store, &logger::raft_logger(params.id))
            .map_err(|e| StorageError::corrupt("raft state", e))?;
        let started = time.now();
        let election_timeout =
            Duration::from_millis(params.raft.tick_ms * params.raft.election_ticks as u64);
        // A lease granted on the promise an earlier run named may outlast
        // this run's own election timeout, when the timing was shortened.
        let refuse_votes_until =
            started + election_timeout.max(recorded_promise.unwrap_or_default());
        let max_workers = params.ids.lock().layout().max_workers();
        let mut node = Node {
            id: params.id,
            raw,
            machine,
            core: Allocator::new(params.namespaces.clone()),
            namespaces: params.namespaces,
            transport: outbox(&peers),
            syncer,
            sync_pending: None,
            sync_since: None,
            held: VecDeque::new(),
            inbox,
            time,
            tick: Duration::from_millis(params.raft.tick_ms),
            election_timeout,
            request_timeout: Duration::from_millis(params.raft.request_timeout_ms),
            compact_threshold: params.raft.compact_threshold,
            started,
            refuse_votes_until,
            promise_to_record,
            disk: meta_disk,
            unconfirmed: Vec::new(),
            reads: VecDeque::new(),
            read_peers: (params.raft.read_round_peers == ReadRoundPeers::Majority)
                .then(ReadPeers::default),
            lease: (params.raft.read_mode == ReadMode::Lease).then(|| {
                if params.testing.stretch_lease {
                    Duration::from_millis(params.raft.tick_ms)
                        * params.raft.election_ticks as u32
                        * 3
                } else {
                    vote_promise(&params.raft) * LEASE_NUM / LEASE_DEN
                }
            }),
            lease_forbidden_term: 0,
            lease_until: None,
            waiting: Vec::new(),
            dense_pending: Vec::new(),
            raises_sent_ms: None,
            refill_batch_ms: params.raft.refill_batch_ms,
            proposals: BTreeMap::new(),
            leader_start: None,
            next_ctx: 1,
            recent: RecentRequests::default(),
            applied_requests: RecentRequests::default(),
            pending_requests: HashMap::new(),
            handover: None,
            handovers_begun: 0,
            last_leader: 0,
            snapshots_installed: 0,
            max_workers,
            ids: params.ids,
            snowflake: params.snowflake,
            boot: params.boot,
            acquire_sent: None,
            ahead_of_cluster: None,
            ahead_of_cluster_ms: 0,
            renew_sent: None,
            skip_leadership_check: params.testing.skip_leadership_check,
            keys_released: 0,
            read_rounds_sent: 0,
            trim_parts: 0,
            trim_part_keys: match params.testing.trim_part_keys {
                0 => TRIM_PART_KEYS,
                n => n,
            },
            handover_idle_ms: match params.testing.handover_idle_ms {
                0 => HANDOVER_IDLE_MS,
                n => n,
            },
            read_resends: 0,
            on_runtime: false,
            peer_data_ids,
            data_id,
            bind_sent: HashMap::new(),
            misdirected_logged: None,
            last_heard: HashMap::new(),
            snapshot_sent: HashMap::new(),
            addrs: params.addrs.clone(),
            peer_promises: PeerPromises::default(),
            peer_clocks: PeerClocks::default(),
            worker_tenure,
            some_unbound: true,
        };
        node.load_request_records()?;
        node.refresh_members()?;
        Ok(node)
    }

    /// Tells the peer service who the other members are now, with their
    /// incarnations, by which it keeps their data ids
    /// ([`crate::storage::identity`]).
    fn refresh_members(&mut self) -> Result<(), StorageError> {
        let since = self.machine.member_since()?;
        let bound = self.machine.data_ids()?;
        let cs = self.raw.store().conf_state();
        let members = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners_next)
            .filter(|id| **id != self.id)
            .map(|id| {
                let incarnation = Incarnation {
                    since: since.get(id).copied().unwrap_or(0),
                    bound: bound.get(id).copied(),
                };
                (*id, incarnation)
            })
            .collect();
        self.some_unbound = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .any(|id| !bound.contains_key(id));
        if let Some(&b) = bound.get(&self.id) {
            if self.data_id != 0 && b != self.data_id {
                tracing::error!(
                    node_id = self.id,
                    bound = %format_args!("{b:016x}"),
                    this = %format_args!("{:016x}", self.data_id),
                    "another data directory is bound to this node's id in the cluster: this \
                     one is new, so the node lost its Raft state; its peers refuse it until \
                     it is removed and started with --join as a replacement"
                );
            }
        }
        self.peer_data_ids.set_members(members)
    }

    /// Binds members' data directories to their incarnations through the
    /// log (storage::identity), so that every node refuses another
    /// directory under a member's id, also a node that never heard from it.
    /// The leader proposes a binding for itself and for each member whose
    /// directory it has recorded, and only once it has recorded every
    /// member's (each runs a build that names it), so that no build without
    /// the command has to apply one. The first binding of an incarnation
    /// stands.
    fn bind_tick(&mut self, now: Instant) {
        if !self.some_unbound || self.raw.raft.state != StateRole::Leader || self.data_id == 0 {
            return;
        }
        if !self.peer_data_ids.every_member_named() {
            return;
        }
        let (since, bound) = match (self.machine.member_since(), self.machine.data_ids()) {
            (Ok(since), Ok(bound)) => (since, bound),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot read the members' incarnations");
                return;
            }
        };
        let mut unbound: Vec<(u64, u64)> = self
            .peer_data_ids
            .records()
            .into_iter()
            .filter(|(node, _, node_since)| since.get(node).copied().unwrap_or(0) == *node_since)
            .map(|(node, data_id, _)| (node, data_id))
            .collect();
        unbound.push((self.id, self.data_id));
        // Only members (a leader whose removal applied may lead on in
        // raft-rs 0.7), and only real ids: anything else would apply as
        // nothing and be proposed again every second.
        let cs = self.raw.store().conf_state();
        unbound.retain(|(node, data_id)| {
            *data_id != 0
                && !bound.contains_key(node)
                && (cs.voters.contains(node) || cs.learners.contains(node))
        });
        for (node, data_id) in unbound {
            let retry = Duration::from_secs(1);
            if self
                .bind_sent
                .get(&node)
                .is_some_and(|t| now.duration_since(*t) < retry)
            {
                continue;
            }
            self.bind_sent.insert(node, now);
            let cmd = Command {
                kind: Some(command::Kind::BindDataId(BindDataId {
                    node_id: node,
                    since: since.get(&node).copied().unwrap_or(0),
                    data_id,
                })),
            };
            metrics::counter!(m::RAFT_PROPOSALS_TOTAL, "kind" => command_kind(&cmd)).increment(1);
            // Not tracked: the outcome shows in the state machine's
            // bindings when it applies, and is proposed again until then.
            if let Err(e) = self.raw.propose(Vec::new(), cmd.encode_to_vec()) {
                tracing::debug!(error = %e, "data id binding dropped; will retry");
            }
        }
    }

    /// The node's loop: a task on the server's runtime rather than a thread
    /// of its own, so that a call's trip from its gRPC handler to the node
    /// and back is a task wake-up on the same workers, not two cross-thread
    /// wake-ups (on the two-core VM each waited ~70 us for a core under
    /// load). The loop awaits only its mailbox; disk writes run through
    /// [`Node::blocking`].
    async fn run(mut self) {
        self.on_runtime = true;
        tracing::info!(
            node_id = self.id,
            applied = self.machine.applied(),
            "raft node started"
        );
        let mut next_tick = Instant::now() + self.tick;
        loop {
            // Wake for the tick, or sooner to resend a slow read round.
            let wake = self
                .read_resend_at()
                .map_or(next_tick, |at| at.min(next_tick));
            let first = match tokio::time::timeout_at(wake.into(), self.inbox.recv()).await {
                Ok(Some(input)) => Some(input),
                Ok(None) => return,
                Err(_elapsed) => None,
            };
            let mut stop = None;
            if let Some(input) = first {
                stop = self.on_input(input);
                for _ in 0..MAX_INPUTS_PER_ROUND {
                    if stop.is_some() {
                        break;
                    }
                    match self.inbox.try_recv() {
                        Ok(input) => stop = self.on_input(input),
                        Err(_) => break,
                    }
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick += self.tick;
                if next_tick < now {
                    next_tick = now + self.tick;
                }
                if let Some(exit) = self.on_tick(now) {
                    stop = Some(exit);
                }
            }
            let handed_over = match self.pass() {
                Ok(exit) => exit,
                Err(e) => {
                    // Fail-stop: a node that cannot persist must not keep
                    // voting or answering.
                    tracing::error!(node_id = self.id, error = %e, "storage failure; stopping the node");
                    std::process::exit(70);
                }
            };
            if let Some(exit) = stop.or(handed_over) {
                self.fail_all(NodeError::Stopped);
                tracing::info!(node_id = self.id, "raft node stopped");
                let _ = exit.send(());
                return;
            }
        }
    }

    /// One Raft tick and the timers that run with it. Returns the sender to
    /// notify if a handover that was to stop the node has run out of time.
    pub(crate) fn on_tick(&mut self, now: Instant) -> Option<oneshot::Sender<()>> {
        self.check_pending_sync(now);
        self.raw.tick();
        self.expire(now);
        self.release_idle_keys();
        self.snowflake_tick(now);
        self.bind_tick(now);
        self.record_promise_tick(now);
        self.export_gauges();
        debug_assert!(
            !(self.core.is_serving() && self.stopped_for_handover()),
            "node {}: serving during a handover's trim",
            self.id
        );
        self.check_handover_deadline(now)
    }

    /// Drains the inputs queued for this node (the simulation's loop; the
    /// real one also waits for them).
    pub(crate) fn drain_inbox(&mut self) -> Option<oneshot::Sender<()>> {
        let mut stop = None;
        while stop.is_none() {
            match self.inbox.try_recv() {
                Ok(input) => stop = self.on_input(input),
                Err(_) => break,
            }
        }
        stop
    }

    /// A [`Node::round`], then the end of a handover whose term is over:
    /// what the loop (the real one and the simulation's) runs after each
    /// batch of inputs. Returns the sender to notify if that handover was
    /// to stop the node.
    pub(crate) fn pass(&mut self) -> Result<Option<oneshot::Sender<()>>, StorageError> {
        self.round()?;
        Ok(self.handover_done())
    }

    /// Start reads, propose, handle Ready, notice role changes.
    fn round(&mut self) -> Result<(), StorageError> {
        // Notice a lost leadership before starting a read round: as a
        // follower, raft-rs would forward the round to the new leader, and
        // its answer must not confirm this node's stale memory.
        self.check_role();
        self.resend_slow_round();
        self.start_read_round();
        self.propose_raises();
        self.release_before_handover();
        self.propose_trim_parts();
        self.on_ready()?;
        self.check_role();
        // A round that completed in the Ready makes room for the calls that
        // queued behind it; calls served during the Ready (confirmed reads,
        // applied refills) may have queued raises, and applied parts of a
        // trim make room for the next. All now, not a tick later.
        self.start_read_round();
        self.propose_raises();
        self.release_before_handover();
        self.propose_trim_parts();
        // A role change may have queued work too (LeaderStart).
        if self.raw.has_ready() {
            self.on_ready()?;
        }
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.time.now().duration_since(self.started).as_millis() as u64
    }

    fn leader_hint(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            0 => None,
            id if id == self.id => None,
            id => Some(id),
        }
    }

    /// A message for another node id: a peer holds this node's address for
    /// that node (a stale one, or two nodes swapped). raft-rs does not check
    /// the receiver, and stepping it would apply that node's commit index
    /// and entries to this log.
    fn drop_misdirected(&mut self, msg: &::raft::prelude::Message) {
        metrics::counter!(m::MISDIRECTED_MESSAGES_TOTAL).increment(1);
        let now = self.time.now();
        if self
            .misdirected_logged
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10))
        {
            self.misdirected_logged = Some(now);
            tracing::warn!(
                node_id = self.id,
                from = msg.from,
                to = msg.to,
                "dropped a raft message for another node: the sender holds this node's \
                 address for that node (logged once per 10 s)"
            );
        }
    }

    /// Whether a snapshot message to `to` has not reached the outbox yet.
    fn snapshot_unsent(&self, to: u64) -> bool {
        self.raw
            .raft
            .msgs
            .iter()
            .chain(self.held.iter().flat_map(|(_, msgs)| msgs))
            .any(|m| m.to == to && m.get_msg_type() == MessageType::MsgSnapshot)
    }

    pub(crate) fn on_input(&mut self, input: Input) -> Option<oneshot::Sender<()>> {
        match input {
            Input::Raft(msg) => {
                if msg.to != self.id {
                    self.drop_misdirected(&msg);
                    return None;
                }
                // Only answers to this leader count: a cut-off follower
                // still sends pre-votes.
                if matches!(
                    msg.get_msg_type(),
                    MessageType::MsgAppendResponse | MessageType::MsgHeartbeatResponse
                ) && msg.term == self.raw.raft.term
                {
                    self.last_heard.insert(msg.from, self.time.now());
                }
                if self.refuses_vote(&msg) {
                    return None;
                }
                self.note_read_ack(&msg);
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "raft message ignored");
                }
            }
            Input::Persisted(number) => self.on_persisted(number),
            Input::Unreachable(id) => {
                self.raw.report_unreachable(id);
                // Do not wait out the resend delay on a follower the
                // transport already knows it cannot reach.
                let chosen = self.read_peers.as_mut().is_some_and(|p| p.forget(id));
                if chosen && !self.reads.is_empty() && self.raw.raft.state == StateRole::Leader {
                    self.broadcast_pending_round();
                }
            }
            Input::SnapshotSent(SnapshotReport {
                to,
                index,
                send,
                bytes,
                ok,
            }) => {
                let pending = self.raw.raft.prs().get(to).is_some_and(|pr| {
                    pr.state == ::raft::ProgressState::Snapshot && pr.pending_snapshot == index
                });
                // raft-rs would take a report on an earlier send, or an
                // older snapshot, for the one out now. A snapshot it made
                // pending again earlier in this batch of inputs (a
                // heartbeat response resumed the follower) has no number
                // yet: it waits in raft-rs's queue, or held for a sync.
                let newest = self.transport.newest_snapshot_send(to) == Some(send)
                    && !self.snapshot_unsent(to);
                if !(pending && newest) {
                    tracing::debug!(
                        node_id = self.id,
                        to,
                        index,
                        send,
                        ok,
                        pending,
                        "report on a snapshot send no longer under way ignored"
                    );
                    return None;
                }
                if ok {
                    metrics::counter!(m::SNAPSHOTS_SENT_TOTAL).increment(1);
                    // The snapshot held now, which may be newer than the
                    // one sent (built since for another follower, or as
                    // the log's start passed the old one): compaction may
                    // then pass the old one, so the follower installing it
                    // needs the new one next, and the grace keeps that
                    // ready rather than have it built again.
                    if let Some((index, false)) = self.raw.store().snapshot_hold() {
                        let until = self.time.now() + snapshot_install_grace(bytes);
                        self.snapshot_sent.insert(to, (index, until));
                    }
                }
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
            Input::Allocate {
                items,
                request_id,
                reply,
                deadline,
            } => self.accept(Call::Allocate {
                items,
                request_id,
                reply,
                deadline,
            }),
            Input::Current {
                key,
                reply,
                deadline,
            } => self.accept(Call::Current {
                key,
                reply,
                deadline,
            }),
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::TransferLeader { to, reply } => self.begin_handover(to, Some(reply), None),
            Input::ChangeMembership { change, reply } => self.change_membership(change, reply),
            Input::Shutdown(done) => {
                if self.raw.raft.state != StateRole::Leader {
                    return Some(done);
                }
                self.begin_handover(None, None, Some(done));
            }
        }
        None
    }

    /// A handover past its release phase: this leader serves nothing more
    /// in its term.
    fn stopped_for_handover(&self) -> bool {
        self.handover
            .as_ref()
            .is_some_and(|h| !matches!(h.phase, HandoverPhase::Releasing { .. }))
    }

    fn accept(&mut self, call: Call) {
        let leading = matches!(self.core.role(), Role::Leader { .. });
        if !leading || self.stopped_for_handover() {
            call.fail(NodeError::NotLeader {
                leader: self.leader_hint(),
            });
            return;
        }
        if self.lease_valid() {
            metrics::counter!(m::LEASE_READS_TOTAL).increment(1);
            self.serve(call);
            self.renew_lease_early();
            return;
        }
        if self.core.is_serving() && (self.lone_voter_leading() || self.confirmed_by_commit(&call))
        {
            self.serve(call);
            return;
        }
        self.unconfirmed.push(call);
    }

    /// Whether the call is answered only once a raise this leadership
    /// proposes commits (a dense allocation), which proves the leadership
    /// as a read round would: an entry of term T commits only if no leader
    /// of a later term had committed anything before it was proposed
    /// (such a leader's entries are on a majority, which then refuses term
    /// T's appends, and no later leader's log can hold an entry of term T
    /// after one of its own term). So every number a later leader handed
    /// out before this call began lies above the raise, and a deposed
    /// leader's reservation never commits and is never answered. What a
    /// dense call may get without a commit is a retry's recorded range (a
    /// fact a committed entry settled) or an exhausted key (ceilings only
    /// grow): neither depends on still leading.
    fn confirmed_by_commit(&self, call: &Call) -> bool {
        match call {
            Call::Allocate { items, .. } => items
                .first()
                .is_some_and(|(key, _)| self.namespaces.spec(key.namespace()).mode == Mode::Dense),
            Call::Current { .. } => false,
        }
    }

    /// Whether this node leads a configuration in which it is the only
    /// voter. Then no other node can be elected without this one's vote,
    /// which this loop would have to grant (stepping down) before it
    /// serves another call; raft-rs answers such a leader's read rounds
    /// from the same check, without messages, but only in the next Ready.
    /// The configuration is the applied one (raft-rs switches on applying
    /// a change), and a change to it is committed by this voter alone, so
    /// no node can hold a newer one that this node has not committed.
    fn lone_voter_leading(&self) -> bool {
        let voters = self.raw.raft.prs().conf().voters();
        self.raw.raft.state == StateRole::Leader
            && voters.is_singleton()
            && voters.contains(self.id)
    }

    /// Whether this leadership holds a lease now: a read round that started
    /// less than a lease ago has completed, and no handover has begun (a
    /// transfer lets the new leader campaign at once, through any lease).
    /// The lease is the allocator's leadership's: raft-rs may already have
    /// stepped down to a later term on a message earlier in this batch of
    /// inputs, before `check_role` brings the allocator's role along, and
    /// a call after that message must not be answered from the old term's
    /// memory (a new leader elected by a transfer may have answered a
    /// later call already).
    fn lease_valid(&self) -> bool {
        let Some(until) = self.lease_until else {
            return false;
        };
        let term = self.raw.raft.term;
        self.raw.raft.state == StateRole::Leader
            && matches!(self.core.role(), Role::Leader { term: t, serving: true } if t == term)
            && term != self.lease_forbidden_term
            && self
                .handover
                .as_ref()
                .is_none_or(|h| matches!(h.phase, HandoverPhase::Releasing { .. }))
            && self.time.now() < until
    }

    /// Under steady load, renews the lease before it runs out so calls
    /// never wait for a round: a round with no calls once half is used.
    fn renew_lease_early(&mut self) {
        let (Some(lease), Some(until)) = (self.lease, self.lease_until) else {
            return;
        };
        if self.reads.is_empty()
            && self.raw.raft.commit_to_current_term()
            && until.saturating_duration_since(self.time.now()) < lease / 2
        {
            self.send_read_round(Vec::new());
        }
    }

    /// A follower promised, by acknowledging a leader's heartbeat, not to
    /// vote for anyone else for an election timeout (raft-rs ignores votes
    /// while it has heard from a leader within that time, with check_quorum);
    /// a lease-mode leader relies on it. A restarted node has forgotten that
    /// promise, so it refuses every vote for an election timeout after it
    /// starts, or for the promise its previous run named if that was longer
    /// (a rolling change that shortened the timing: leases were granted on
    /// the promise the leader was told). In every mode, as read_mode is per
    /// node: a read_index node may serve a lease-mode leader. It costs
    /// nothing in steady timing, as raft-rs waits at least an election
    /// timeout before it campaigns itself.
    fn refuses_vote(&self, msg: &::raft::prelude::Message) -> bool {
        let vote = matches!(
            msg.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        let refuse = vote && self.time.now() < self.refuse_votes_until;
        if refuse {
            tracing::debug!(
                node_id = self.id,
                from = msg.from,
                "vote refused: started less than an election timeout (or the vote promise \
                 an earlier run named) ago"
            );
        }
        refuse
    }

    /// Records this run's shorter vote promise once the leases resting on
    /// the previous run's longer one have run out. Recorded sooner, a
    /// second restart would forget the longer promise those leases still
    /// rely on.
    fn record_promise_tick(&mut self, now: Instant) {
        let Some(promise) = self.promise_to_record else {
            return;
        };
        if now < self.refuse_votes_until {
            return;
        }
        // Tried once: if it fails, the longer promise stays recorded, and
        // a restart only refuses votes for longer than it must.
        self.promise_to_record = None;
        if let Err(e) = storage::record_vote_promise(&self.disk, promise) {
            tracing::warn!(node_id = self.id, error = %e, "recording the vote promise failed");
        }
    }

    fn start_read_round(&mut self) {
        if self.unconfirmed.is_empty() || !self.core.is_serving() {
            return;
        }
        if self.skip_leadership_check {
            for call in std::mem::take(&mut self.unconfirmed) {
                self.serve(call);
            }
            return;
        }
        if self.reads.len() >= MAX_READ_ROUNDS || !self.raw.raft.commit_to_current_term() {
            return;
        }
        let calls = std::mem::take(&mut self.unconfirmed);
        self.send_read_round(calls);
    }

    /// Sends a ReadIndex round. Only once this term has committed an entry:
    /// raft-rs drops a round asked for before that without a word, and the
    /// round would then hold its place in `reads` until the term ends.
    fn send_read_round(&mut self, calls: Vec<Call>) {
        debug_assert!(self.raw.raft.commit_to_current_term());
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        let queued = self.raw.raft.msgs.len();
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.keep_round_heartbeats(ctx, queued);
        metrics::counter!(m::RAFT_READ_ROUNDS_TOTAL).increment(1);
        self.read_rounds_sent += 1;
        self.reads.push_back((ctx, self.time.now(), calls));
    }

    /// raft-rs has just queued, after the first `queued` messages, round
    /// `ctx`'s heartbeat for every other node (learners too); keeps those
    /// to the followers chosen for it (see `read_peers`).
    fn keep_round_heartbeats(&mut self, ctx: u64, queued: usize) {
        if self.read_peers.is_none() {
            return;
        }
        let majority = self.read_followers();
        let Some(peers) = self.read_peers.as_mut() else {
            return;
        };
        let Some((followers, needed)) = majority else {
            peers.reset();
            return;
        };
        let Some(chosen) = peers.targets(ctx, &followers, needed) else {
            return;
        };
        let ctx = ctx.to_be_bytes();
        let added = self.raw.raft.msgs.split_off(queued);
        debug_assert!(added
            .iter()
            .all(|m| m.get_msg_type() == MessageType::MsgHeartbeat && m.get_context() == ctx));
        self.raw.raft.msgs.extend(added.into_iter().filter(|m| {
            m.get_msg_type() != MessageType::MsgHeartbeat
                || m.get_context() != ctx
                || chosen.contains(&m.to)
        }));
    }

    /// The voters other than this leader and how many of them make a
    /// majority with it (None: rounds go to everyone).
    fn read_followers(&self) -> Option<(Vec<u64>, usize)> {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        followers_needed(self.id, cs.voters, !cs.voters_outgoing.is_empty())
    }

    /// A follower's answer to a read round's heartbeat (or to raft-rs's
    /// periodic one, which carries the newest pending round).
    fn note_read_ack(&mut self, msg: &::raft::prelude::Message) {
        let probing = self.read_peers.as_ref().is_some_and(ReadPeers::probing);
        if msg.get_msg_type() != MessageType::MsgHeartbeatResponse
            || self.reads.is_empty()
            || !probing
        {
            return;
        }
        let Ok(bytes) = <[u8; 8]>::try_from(msg.get_context()) else {
            return;
        };
        if let (Some((followers, needed)), Some(peers)) =
            (self.read_followers(), self.read_peers.as_mut())
        {
            let ctx = u64::from_be_bytes(bytes);
            peers.on_ack(msg.from, ctx, &followers, needed);
        }
    }

    /// When the oldest pending round goes to every follower if it has not
    /// completed by then.
    fn read_resend_at(&self) -> Option<Instant> {
        let (_, started, _) = self.reads.front()?;
        Some(*started + self.read_peers.as_ref()?.resend_after()?)
    }

    /// Sends the pending rounds to every follower if the oldest has waited
    /// too long on the chosen ones: raft-rs's heartbeat carries the newest
    /// pending round, and its answers confirm the older ones too.
    fn resend_slow_round(&mut self) {
        let (Some((_, started, _)), Some((newest, _, _))) = (self.reads.front(), self.reads.back())
        else {
            return;
        };
        let age = self.time.now().saturating_duration_since(*started);
        let Some(peers) = self.read_peers.as_mut() else {
            return;
        };
        if peers.resend(age, *newest) {
            self.broadcast_pending_round();
        }
    }

    /// Sends raft-rs's heartbeat, which carries the newest pending round's
    /// context, to every follower.
    fn broadcast_pending_round(&mut self) {
        metrics::counter!(m::RAFT_READ_RESENDS_TOTAL).increment(1);
        self.read_resends += 1;
        self.raw.raft.bcast_heartbeat();
    }

    fn on_read_states(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(bytes) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            let ctx = u64::from_be_bytes(bytes);
            while let Some((c, started, calls)) = self.reads.pop_front() {
                if c > ctx {
                    self.reads.push_front((c, started, calls));
                    break;
                }
                let took = self.time.now().saturating_duration_since(started);
                metrics::histogram!(m::RAFT_READ_ROUND_SECONDS).record(took.as_secs_f64());
                if let Some(peers) = self.read_peers.as_mut() {
                    peers.on_complete(took);
                }
                // A majority heard from this leader after `started`, so none
                // of them votes for another before started + election timeout.
                if let Some(own) = self.lease {
                    let until = started + self.lease_now(own);
                    self.lease_until = Some(self.lease_until.map_or(until, |u| u.max(until)));
                }
                // Rounds complete in order; one that completes confirms every
                // earlier round too.
                for call in calls {
                    self.serve(call);
                }
                if c == ctx {
                    break;
                }
            }
        }
    }

    /// Serves a call whose leadership check has passed.
    fn serve(&mut self, call: Call) {
        let source = Source {
            machine: &self.machine,
            namespaces: &self.namespaces,
        };
        match call {
            Call::Current {
                key,
                reply,
                deadline,
            } => match self.core.current(&key, &source) {
                Ok(v) => {
                    let _ = reply.send(Ok((v, self.core.epoch())));
                }
                Err(e) => Call::Current {
                    key,
                    reply,
                    deadline,
                }
                .fail(self.alloc_error(e)),
            },
            Call::Allocate {
                items,
                request_id,
                reply,
                deadline,
            } => {
                if reply.is_closed() {
                    return;
                }
                let request = match (&request_id, items.first()) {
                    (Some(id), Some((key, _))) => Some((key.namespace(), id.clone())),
                    _ => None,
                };
                if let Some(rkey) = &request {
                    // Each table's records hold its own hash of the items:
                    // the leader's (segmented calls) a fast one of this
                    // build, the log's (dense calls) FNV-1a.
                    let recorded = match self.recent.get(rkey) {
                        Some(r) => Some((r, self.recent.items_hash(&items))),
                        None => self
                            .applied_requests
                            .get(rkey)
                            .map(|r| (r, items_hash(&items))),
                    };
                    if let Some(((recorded, ranges, epoch), hash)) = recorded {
                        let result = if *recorded == hash {
                            Ok(Grant {
                                ranges: ranges.clone(),
                                // The epoch the numbers came in: the one
                                // now in force may be later, and would hide
                                // the holes between them.
                                epoch: if *epoch == 0 {
                                    self.core.epoch()
                                } else {
                                    *epoch
                                },
                                replayed: true,
                            })
                        } else {
                            Err(NodeError::RequestIdReused)
                        };
                        let _ = reply.send(result);
                        return;
                    }
                    if let Some(pending) = self.pending_requests.get_mut(rkey) {
                        if pending.items == items_hash(&items) {
                            pending.retries.push(reply);
                        } else {
                            let _ = reply.send(Err(NodeError::RequestIdReused));
                        }
                        return;
                    }
                }
                match self.core.allocate(&items, &source) {
                    Ok(Allocation::Granted(ranges)) => {
                        if let Some(rkey) = request {
                            let hash = self.recent.items_hash(&items);
                            let epoch = self.core.epoch();
                            let now = self.time.now();
                            if let Some(kept) =
                                self.recent.insert(rkey, hash, ranges.clone(), epoch, now)
                            {
                                metrics::gauge!(
                                    m::REQUEST_RECORDS_KEPT_SECONDS,
                                    "records" => "served"
                                )
                                .set(kept.as_secs_f64());
                            }
                        }
                        let _ = reply.send(Ok(Grant {
                            ranges,
                            epoch: self.core.epoch(),
                            replayed: false,
                        }));
                    }
                    Ok(Allocation::Wait) => {
                        metrics::counter!(m::REFILL_WAITS_TOTAL).increment(1);
                        self.waiting.push(Call::Allocate {
                            items,
                            request_id,
                            reply,
                            deadline,
                        })
                    }
                    Ok(Allocation::Reserved(ranges)) => {
                        // Into the log with the raise: FNV-1a, as every
                        // node computes it.
                        let request = request.map(|rkey| (rkey, items_hash(&items)));
                        if let Some((rkey, hash)) = &request {
                            self.pending_requests.insert(
                                rkey.clone(),
                                PendingRequest {
                                    items: *hash,
                                    retries: Vec::new(),
                                },
                            );
                        }
                        self.dense_pending.push(DenseWaiter {
                            reply,
                            ranges,
                            request,
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.alloc_error(e)));
                    }
                }
            }
        }
    }

    fn alloc_error(&self, e: AllocError) -> NodeError {
        match e {
            AllocError::NotServing => NodeError::NotLeader {
                leader: self.leader_hint(),
            },
            AllocError::Exhausted { .. } => NodeError::Exhausted(e.to_string()),
        }
    }

    fn propose_raises(&mut self) {
        if !self.core.is_serving() {
            return;
        }
        let now_ms = self.now_ms();
        let due = !self.dense_pending.is_empty()
            || self.core.refill_urgent()
            || self
                .raises_sent_ms
                .is_none_or(|sent| now_ms >= sent + self.refill_batch_ms);
        if !due {
            return;
        }
        let raises = self.core.take_raises(now_ms);
        if raises.is_empty() && self.dense_pending.is_empty() {
            return;
        }
        self.raises_sent_ms = Some(now_ms);
        let refills = raises
            .iter()
            .filter(|r| self.namespaces.spec(r.key.namespace()).mode == Mode::Segmented)
            .count();
        metrics::counter!(m::REFILLS_TOTAL).increment(refills as u64);
        let keys = self.key_ceilings(&raises);
        let waiters = std::mem::take(&mut self.dense_pending);
        let requests = waiters
            .iter()
            .filter_map(|w| {
                let ((ns, id), items) = w.request.as_ref()?;
                Some(RequestGrant {
                    namespace: self.core.namespace_name(*ns).to_string(),
                    request_id: id.as_str().to_string(),
                    items: *items,
                    firsts: w.ranges.iter().map(SeqRange::first).collect(),
                    counts: w.ranges.iter().map(SeqRange::count).collect(),
                    // Set by the state machine as it applies.
                    epoch: 0,
                })
            })
            .collect();
        let cmd = Command {
            kind: Some(command::Kind::Raise(RaiseCeilings { keys, requests })),
        };
        if let Err(waiters) = self.propose(cmd, Proposal::Raises(waiters)) {
            // The reservations are lost with the proposal: fail the calls.
            if let Proposal::Raises(ws) = waiters {
                for w in ws {
                    let err = NodeError::NotLeader {
                        leader: self.leader_hint(),
                    };
                    self.settle_dense(w, Err(err));
                }
            }
            self.serve_after_a_new_start();
        }
    }

    /// Proposes the release of keys idle past their namespace's limit (see
    /// [`crate::core::Allocator::take_releases`]).
    fn release_idle_keys(&mut self) {
        // Only from this term's memory: a node deposed and elected again
        // since the last round still holds the old term's until check_role.
        let term = self.raw.raft.term;
        if !matches!(self.core.role(), Role::Leader { term: t, .. } if t == term) {
            return;
        }
        // A handover's own pass (`release_before_handover`) sweeps with
        // the same cursor, in smaller entries.
        if self.handover.is_some() {
            return;
        }
        let releases = self.core.take_releases(self.now_ms(), IDLE_SWEEP_PER_TICK);
        if !releases.is_empty() {
            self.propose_releases(releases);
        }
    }

    /// Proposes the release of keys the allocator marked releasing; the
    /// entry's index, or `None` if raft-rs dropped it (the keys then serve
    /// on as before).
    fn propose_releases(&mut self, mut releases: Vec<Release>) -> Option<u64> {
        // In key order: each key's apply searches the state's memtable and
        // tables, and a search near the one before finds its path cached.
        releases.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let keys = releases
            .iter()
            .map(|r| ReleasedKey {
                namespace: self.core.namespace_name(r.key.namespace()).to_string(),
                key: r.key.key().to_string(),
                ceiling: r.ceiling,
                from: r.from,
            })
            .collect();
        let cmd = Command {
            kind: Some(command::Kind::Release(ReleaseKeys { keys })),
        };
        let released = releases.into_iter().map(|r| r.key).collect();
        match self.propose(cmd, Proposal::Release(released)) {
            Ok(index) => Some(index),
            Err(Proposal::Release(keys)) => {
                self.core.end_release(&keys);
                None
            }
            Err(_) => None,
        }
    }

    /// The key an applied record names, if this node's configuration still
    /// has its namespace and accepts the key (a record written under an
    /// older configuration may name neither).
    fn applied_key(&self, kc: &KeyCeiling) -> Option<SeqKey> {
        let ns = self.core.namespaces().lookup(&kc.namespace)?;
        SeqKey::try_new(self.core.namespaces(), ns, kc.key.clone()).ok()
    }

    /// Fills the applied-request table from the records the state machine
    /// stores (at start, and after a snapshot replaced the state), so a
    /// retry finds what its id got before this node restarted or caught up.
    fn load_request_records(&mut self) -> Result<(), StorageError> {
        self.applied_requests.clear();
        for g in self.machine.request_grants()? {
            self.record_applied_request(&g);
        }
        Ok(())
    }

    /// Records what an applied raise gave a request id. Entries this build
    /// cannot read (an unknown namespace, a malformed range) are skipped:
    /// the record only saves a retry a new range.
    fn record_applied_request(&mut self, g: &RequestGrant) {
        let Ok(ns) = self.namespaces.resolve(&g.namespace) else {
            return;
        };
        let Ok(Some(id)) = RequestId::try_new(g.request_id.as_str()) else {
            return;
        };
        let ranges: Option<Vec<SeqRange>> = g
            .firsts
            .iter()
            .zip(&g.counts)
            .map(|(first, count)| SeqRange::try_new(*first, *count))
            .collect();
        match ranges {
            Some(ranges) if !ranges.is_empty() && g.firsts.len() == g.counts.len() => {
                let now = self.time.now();
                if let Some(kept) =
                    self.applied_requests
                        .insert((ns, id), g.items, ranges, g.epoch, now)
                {
                    metrics::gauge!(m::REQUEST_RECORDS_KEPT_SECONDS, "records" => "applied")
                        .set(kept.as_secs_f64());
                }
            }
            _ => {}
        }
    }

    fn key_ceilings(&self, raises: &[DenseRaise]) -> Vec<KeyCeiling> {
        raises
            .iter()
            .map(|r| KeyCeiling {
                namespace: self.core.namespace_name(r.key.namespace()).to_string(),
                key: r.key.key().to_string(),
                ceiling: r.ceiling,
            })
            .collect()
    }

    /// Proposes a command; gives the proposal back if raft-rs drops it.
    fn propose(&mut self, cmd: Command, what: Proposal) -> Result<u64, Proposal> {
        metrics::counter!(m::RAFT_PROPOSALS_TOTAL, "kind" => command_kind(&cmd)).increment(1);
        match self.raw.propose(Vec::new(), cmd.encode_to_vec()) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.proposals.insert(index, (self.raw.raft.term, what));
                Ok(index)
            }
            Err(e) => {
                tracing::warn!(error = %e, "proposal dropped");
                Err(what)
            }
        }
    }

    /// Stops serving until a start-of-term entry proposed now applies, as
    /// a new leader does. A raise proposed before a dropped one may still
    /// commit: memory reloaded now from the applied ceilings would hand out
    /// its numbers again (a dense call's, recorded under its request id,
    /// to a retry of it), and the segments forgotten leave holes. The new
    /// entry applies after every raise proposed before it, and changes the
    /// epoch.
    fn serve_after_a_new_start(&mut self) {
        self.reset_allocator();
        self.core.become_leader(self.raw.raft.term);
        self.leader_start = None;
        for call in std::mem::take(&mut self.waiting) {
            call.fail(NodeError::NotLeader { leader: None });
        }
    }

    /// Starts (`Some`) or aborts (`None`) a raft-rs leadership transfer
    /// without a handover, which makes raft-rs drop this leader's
    /// proposals meanwhile.
    #[cfg(test)]
    pub(crate) fn raft_transfer_for_test(&mut self, to: Option<u64>) {
        match to {
            Some(t) => self.raw.transfer_leader(t),
            None => self.raw.raft.abort_leader_transfer(),
        }
    }

    /// Forgets the allocator's memory (but keys being released, see
    /// [`crate::core::Allocator::forget_settled`]) and fails every call
    /// holding a dense reservation, which the forgotten state can no longer
    /// protect.
    fn reset_allocator(&mut self) {
        self.core.forget_settled();
        self.recent.clear();
        let hint = self.leader_hint();
        for w in self.dense_pending.drain(..) {
            let _ = w.reply.send(Err(NodeError::NotLeader { leader: hint }));
        }
        for (_, (_, p)) in self.proposals.iter_mut() {
            if let Proposal::Raises(ws) = p {
                for w in ws.drain(..) {
                    let _ = w.reply.send(Err(NodeError::NotLeader { leader: hint }));
                }
            }
        }
        for (_, pending) in self.pending_requests.drain() {
            for reply in pending.retries {
                let _ = reply.send(Err(NodeError::NotLeader { leader: hint }));
            }
        }
    }

    /// Answers a dense call whose raise has settled, and the retries that
    /// joined it. (What a request id got was recorded when its raise
    /// applied.)
    fn settle_dense(&mut self, w: DenseWaiter, result: Result<Grant, NodeError>) {
        let mut seen = false;
        if let Some((rkey, _)) = w.request {
            let retries = self
                .pending_requests
                .remove(&rkey)
                .map(|p| p.retries)
                .unwrap_or_default();
            for reply in retries {
                let repeat = result.clone().map(|g| Grant {
                    replayed: true,
                    ..g
                });
                seen |= reply.send(repeat).is_ok();
            }
        }
        let granted = result.is_ok();
        seen |= w.reply.send(result).is_ok();
        if granted && !seen {
            metrics::counter!(m::DENSE_UNANSWERED_TOTAL).increment(1);
        }
    }

    fn fail_all(&mut self, err: NodeError) {
        self.lease_until = None;
        if let Some(peers) = self.read_peers.as_mut() {
            peers.reset();
        }
        self.reset_allocator();
        for call in self.unconfirmed.drain(..) {
            call.fail(err.clone());
        }
        for (_, _, calls) in self.reads.drain(..) {
            for call in calls {
                call.fail(err.clone());
            }
        }
        for call in self.waiting.drain(..) {
            call.fail(err.clone());
        }
        self.proposals.clear();
        self.leader_start = None;
    }

    fn expire(&mut self, now: Instant) {
        let timeout = NodeError::Timeout(self.request_timeout);
        let (expired, kept): (Vec<Call>, Vec<Call>) =
            self.waiting.drain(..).partition(|c| c.deadline() <= now);
        self.waiting = kept;
        for call in expired {
            call.fail(timeout.clone());
        }
        for (_, _, calls) in self.reads.iter_mut() {
            let (expired, kept): (Vec<Call>, Vec<Call>) =
                calls.drain(..).partition(|c| c.deadline() <= now);
            *calls = kept;
            for call in expired {
                call.fail(timeout.clone());
            }
        }
        // Calls wait here while the leader is not serving yet, or while a
        // read round that cannot complete (no quorum) holds the next one.
        let (expired, kept): (Vec<Call>, Vec<Call>) = self
            .unconfirmed
            .drain(..)
            .partition(|c| c.deadline() <= now);
        self.unconfirmed = kept;
        for call in expired {
            call.fail(timeout.clone());
        }
    }

    fn on_ready(&mut self) -> Result<(), StorageError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // 1. A leader may send before persisting (raft-rs docs, step 1).
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        // New entries and hard state are written without waiting for the
        // disk (the syncer makes them durable), and so are applied entries
        // and the log compaction after them; installing a snapshot writes
        // synced, and it, a configuration change and a long apply are
        // written off the worker thread (see `apply_leaves_loop`).
        let waits_for_disk =
            !ready.snapshot().is_empty() || apply_leaves_loop(ready.committed_entries());
        if waits_for_disk {
            self.blocking(|node| node.finish_ready(ready))
        } else {
            self.finish_ready(ready)
        }
    }

    /// Before a tick: a lone voter wins an election within the tick, and
    /// raft-rs requires a new leader's log to be persisted, so what a
    /// follower-era Ready left to the syncer is synced here first (a
    /// two-voter cluster whose leader was demoted, during a slow fsync). And
    /// a sync pending for [`SYNC_STALL_LIMIT`] means a dead disk: the node
    /// stops, as on any storage failure, rather than lead without being
    /// able to commit (its heartbeats would keep the others from electing
    /// a leader that can).
    fn check_pending_sync(&mut self, now: Instant) {
        let Some(pending) = self.sync_pending else {
            return;
        };
        let voters = self.raw.raft.prs().conf().voters();
        let lone_voter = voters.is_singleton() && voters.contains(self.id);
        if lone_voter && self.raw.raft.state != StateRole::Leader {
            if let Err(e) = self.blocking(|node| node.raw.store().sync_wal()) {
                tracing::error!(node_id = self.id, error = %e, "cannot sync the Raft log; stopping the node");
                std::process::exit(70);
            }
            self.on_persisted(pending);
            return;
        }
        let stalled = self
            .sync_since
            .is_some_and(|since| now.saturating_duration_since(since) > SYNC_STALL_LIMIT);
        if stalled && self.on_runtime {
            tracing::error!(
                node_id = self.id,
                limit = ?SYNC_STALL_LIMIT,
                "the Raft log's fsync has not returned; stopping the node"
            );
            std::process::exit(70);
        }
    }

    /// The log is durable up to Ready `number` (every write before it):
    /// raft-rs may count those entries, and the messages that waited for
    /// them go.
    fn on_persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        if self.sync_pending.is_some_and(|pending| pending <= number) {
            self.sync_pending = None;
            self.sync_since = None;
        }
        while self.held.front().is_some_and(|(n, _)| *n <= number) {
            if let Some((_, msgs)) = self.held.pop_front() {
                self.transport.send(msgs);
            }
        }
    }

    /// Runs `f`, which writes to the disk (a synced write takes
    /// milliseconds on some disks). On the runtime through
    /// `block_in_place`, so that the worker's other tasks (gRPC calls, the
    /// peer transport) move to another thread meanwhile; in the simulation,
    /// directly.
    fn blocking<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        if self.on_runtime {
            tokio::task::block_in_place(|| f(self))
        } else {
            f(self)
        }
    }

    /// Steps 2-6 of handling a Ready (after its first messages went out).
    fn finish_ready(&mut self, mut ready: ::raft::Ready) -> Result<(), StorageError> {
        // 2. A snapshot from the leader replaces state and log.
        if !ready.snapshot().is_empty() {
            let started = Instant::now();
            let snap = ready.snapshot();
            let ingested = self.raw.mut_store().install_snapshot(snap)?;
            self.machine.reload()?;
            self.load_request_records()?;
            self.refresh_members()?;
            self.snapshots_installed += 1;
            metrics::counter!(m::SNAPSHOTS_INSTALLED_TOTAL).increment(1);
            if ingested {
                metrics::counter!(m::SNAPSHOTS_INGESTED_TOTAL).increment(1);
            }
            match self.machine.worker_of(self.id)? {
                Some((worker, fence)) => {
                    // Our own renewal (committed, not applied before the
                    // snapshot), in the holding we know, keeps us issuing;
                    // any other holder's, incarnation's or holding's fence
                    // is a floor, and stops us if it lies above our own.
                    let (tenure, boot) = self.machine.holding(worker)?;
                    let ours = boot == self.boot && self.worker_tenure == Some(tenure);
                    self.worker_tenure = Some(tenure);
                    let mut issuer = self.ids.lock();
                    issuer.assign_worker(worker, fence);
                    if ours {
                        issuer.own_fence(fence);
                    } else {
                        issuer.foreign_fence(fence);
                    }
                }
                None => {
                    self.worker_tenure = None;
                    self.ids.lock().release_worker();
                }
            }
            if let Some(fence) = self.machine.latest_fence_of_others(self.id)? {
                self.ids
                    .lock()
                    .cluster_fence(fence, self.ids.clock.mono_ms());
            }
            for (id, addr) in self.machine.members()? {
                self.transport.add_peer(id, &addr);
                self.addrs.set(id, &addr);
            }
            let took = started.elapsed();
            metrics::gauge!(m::SNAPSHOT_INSTALL_SECONDS).set(took.as_secs_f64());
            tracing::info!(
                node_id = self.id,
                index = snap.get_metadata().index,
                term = snap.get_metadata().term,
                bytes = snap.get_data().len(),
                ingested,
                elapsed_ms = took.as_millis() as u64,
                "installed snapshot"
            );
        }
        // 3. Apply what is committed.
        self.apply(ready.take_committed_entries())?;
        // 4. Entries and hard state. What needs a sync (entries, a term, a
        //    vote) is synced off this loop by the syncer, so that calls keep
        //    being answered during the fsync; with a snapshot installed,
        //    at once (that write was synced anyway).
        let number = ready.number();
        let sync_now = !ready.snapshot().is_empty();
        let mut owed = false;
        if !ready.entries().is_empty() || ready.hs().is_some() {
            let hs = ready.hs().cloned();
            let started = Instant::now();
            owed = self
                .raw
                .mut_store()
                .append(ready.entries(), hs.as_ref(), sync_now)?;
            metrics::histogram!(m::RAFT_APPEND_SECONDS).record(started.elapsed().as_secs_f64());
        }
        let persisted_msgs = ready.take_persisted_messages();
        let read_states = ready.take_read_states();
        // 5. Advance. raft-rs counts this Ready's entries as persisted only
        //    at `on_persisted`; what that makes possible (a commit, the
        //    entries to apply) comes in a later Ready.
        self.raw.advance_append_async(ready);
        if owed {
            if self.sync_pending.is_none() {
                self.sync_since = Some(self.time.now());
            }
            self.sync_pending = Some(number);
            self.syncer.request(number);
        }
        // 6. Messages that needed the write above, in order: after the sync
        //    if one is owed (this Ready's or an earlier one's). Heartbeat
        //    answers go at once: they claim nothing about this node's log
        //    (raft-rs answers from a commit index the leader capped at what
        //    this node acknowledged), and they are what confirms the
        //    leader's read rounds, which must not wait for a follower's fsync.
        if !persisted_msgs.is_empty() {
            match self.sync_pending {
                Some(pending) => {
                    let (now, later): (Vec<_>, Vec<_>) = persisted_msgs
                        .into_iter()
                        .partition(|m| m.get_msg_type() == MessageType::MsgHeartbeatResponse);
                    if !now.is_empty() {
                        self.transport.send(now);
                    }
                    if !later.is_empty() {
                        self.held.push_back((pending, later));
                    }
                }
                None => self.transport.send(persisted_msgs),
            }
        }
        if self.sync_pending.is_none() || sync_now {
            self.on_persisted(number);
        }
        // The entries applied above were persisted when raft-rs handed them
        // out (and a snapshot just now).
        self.raw.advance_apply();
        self.on_read_states(read_states);
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        // A conf change goes to raft-rs first, and the configuration it yields
        // is written in the same batch as the applied index: a crash never
        // leaves the index past a configuration that was not saved.
        let mut start = 0;
        let mut raised = false;
        for (i, e) in entries.iter().enumerate() {
            let conf = matches!(
                e.get_entry_type(),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2
            );
            if conf && e.index > self.machine.applied() {
                raised |= self.apply_chunk(&entries[start..i], None)?;
                let cs = self.apply_conf_change(e)?;
                raised |= self.apply_chunk(&entries[i..=i], cs)?;
                start = i + 1;
            }
        }
        raised |= self.apply_chunk(&entries[start..], None)?;
        if raised && !self.waiting.is_empty() {
            for call in std::mem::take(&mut self.waiting) {
                self.serve(call);
            }
        }
        self.maybe_compact()
    }

    /// Applies entries (none of them a pending conf change, or exactly one
    /// with the configuration it produced). Returns whether ceilings moved.
    fn apply_chunk(
        &mut self,
        entries: &[Entry],
        conf: Option<ConfState>,
    ) -> Result<bool, StorageError> {
        if entries.is_empty() {
            return Ok(false);
        }
        let outcomes = self.machine.apply_with_conf(entries, conf.as_ref())?;
        if let Some(cs) = conf {
            tracing::info!(node_id = self.id, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
            self.raw.mut_store().cache_conf_state(cs);
            self.refresh_members()?;
        }
        let mut raised = false;
        for (entry, outcome) in outcomes {
            match &outcome {
                Applied::Trimmed(_) => {
                    // A trim lowers ceilings: memory of the old segments must
                    // not outlive it (the allocator reloads from the state),
                    // releasing keys' included.
                    raised = true;
                    self.reset_allocator();
                    self.core.forget_all();
                }
                Applied::Raised(kcs, grants) => {
                    raised = true;
                    for kc in kcs {
                        if let Some(key) = self.applied_key(kc) {
                            self.core.on_ceiling_applied(&key, kc.ceiling);
                        }
                    }
                    for g in grants {
                        self.record_applied_request(g);
                    }
                }
                Applied::Released(kcs) => {
                    // Calls on a released key wait until it reloads.
                    raised = true;
                    if self.core.is_serving() {
                        self.keys_released += kcs.len() as u64;
                        metrics::counter!(m::IDLE_RELEASES_TOTAL).increment(kcs.len() as u64);
                    }
                    for kc in kcs {
                        if let Some(key) = self.applied_key(kc) {
                            self.core.on_released(&key, kc.ceiling);
                        }
                    }
                }
                Applied::ConfChange(_) | Applied::ConfChangeRefused(_) => {}
                Applied::WorkerAssigned {
                    node_id,
                    worker,
                    fence_ms,
                    tenure,
                } if *node_id == self.id => {
                    self.worker_tenure = Some(*tenure);
                    self.ids.lock().assign_worker(*worker, *fence_ms);
                    self.acquire_sent = None;
                    self.renew_sent = None;
                    tracing::info!(
                        node_id,
                        worker,
                        floor_ms = fence_ms,
                        "snowflake worker id acquired"
                    );
                }
                Applied::NoFreeWorker { node_id } if *node_id == self.id => {
                    tracing::error!(
                        node_id,
                        "no snowflake worker id is free; this node cannot issue IDs"
                    );
                }
                Applied::NotMember { node_id } if *node_id == self.id => {
                    tracing::warn!(
                        node_id,
                        "no snowflake worker id for a node outside the configuration"
                    );
                }
                Applied::FenceRenewed {
                    node_id,
                    worker,
                    fence_ms,
                    boot,
                } if *node_id == self.id => {
                    let mut issuer = self.ids.lock();
                    if issuer.worker() == Some(*worker) {
                        if *boot == self.boot {
                            issuer.own_fence(*fence_ms);
                            self.renew_sent = None;
                        } else {
                            issuer.foreign_fence(*fence_ms);
                        }
                    }
                }
                // Another node's: the cluster's time, for this node's
                // clock to be compared with (`Issuer::ahead_of_cluster`).
                Applied::FenceRenewed { fence_ms, .. } => {
                    let mono = self.ids.clock.mono_ms();
                    self.ids.lock().cluster_fence(*fence_ms, mono);
                }
                Applied::DataIdBound { node_id, data_id } => {
                    tracing::info!(
                        node_id = self.id,
                        peer_id = node_id,
                        data_id = %format_args!("{data_id:016x}"),
                        "a member's data directory bound"
                    );
                    self.refresh_members()?;
                }
                Applied::WorkerAssigned { .. }
                | Applied::NoFreeWorker { .. }
                | Applied::NotMember { .. }
                | Applied::LeaderStarted { .. }
                | Applied::Empty => {}
            }
            raised |= self.resolve_proposals(entry.index, entry.term, &outcome);
        }
        Ok(raised)
    }

    /// Hands a conf-change entry to raft-rs and, if it takes it, does what
    /// the change means for this node (peers to send to, its own worker id
    /// when it is the node removed); returns the new configuration for the
    /// caller to persist with the applied index, or `None` if raft-rs
    /// refused it, which then changes nothing anywhere (the state machine
    /// also skips it).
    fn apply_conf_change(&mut self, e: &Entry) -> Result<Option<ConfState>, StorageError> {
        if e.get_entry_type() != EntryType::EntryConfChange {
            let cc = ConfChangeV2::parse_from_bytes(&e.data)
                .map_err(|err| StorageError::corrupt("conf change", err))?;
            return Ok(taken(e, self.raw.apply_conf_change(&cc)));
        }
        let cc = ConfChange::parse_from_bytes(&e.data)
            .map_err(|err| StorageError::corrupt("conf change", err))?;
        let Some(cs) = taken(e, self.raw.apply_conf_change(&cc)) else {
            return Ok(None);
        };
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Ok(addr) = std::str::from_utf8(&cc.context) {
                    if !addr.is_empty() {
                        self.transport.add_peer(cc.node_id, addr);
                        self.addrs.set(cc.node_id, addr);
                    }
                }
            }
            ConfChangeType::RemoveNode => {
                self.transport.remove_peer(cc.node_id);
                self.addrs.remove(cc.node_id);
                if cc.node_id == self.id {
                    self.worker_tenure = None;
                    self.ids.lock().release_worker();
                    tracing::warn!(node_id = self.id, "this node was removed from the cluster");
                }
            }
        }
        Ok(Some(cs))
    }

    fn change_membership(&mut self, change: MembershipChange, reply: Reply<Membership>) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(NodeError::NotLeader {
                leader: self.leader_hint(),
            }));
            return;
        }
        if let Err(why) = self.check_membership_change(&change) {
            let _ = reply.send(Err(NodeError::Membership(why)));
            return;
        }
        let mut cc = ConfChange::default();
        match change {
            MembershipChange::AddLearner { id, addr } => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = id;
                cc.context = addr.into_bytes().into();
            }
            MembershipChange::AddVoter { id, addr } => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
                cc.context = addr.into_bytes().into();
            }
            MembershipChange::Remove { id } => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
            }
        }
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                self.proposals
                    .insert(index, (self.raw.raft.term, Proposal::ConfChange(reply)));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Membership(e.to_string())));
            }
        }
    }

    /// Why `change` must not be proposed, if it must not. raft-rs would take
    /// each of these: adding a voter as a learner demotes it (the leader
    /// too), and re-adding a member at another address sends its Raft
    /// traffic there on every node.
    fn check_membership_change(&self, change: &MembershipChange) -> Result<(), String> {
        let conf = self.raw.store().conf_state();
        let voter = |id: &u64| conf.voters.contains(id);
        let learner = |id: &u64| conf.learners.contains(id);
        match change {
            MembershipChange::Remove { id } if *id == self.id => {
                Err("the leader cannot remove itself; transfer leadership first".into())
            }
            MembershipChange::Remove { id } if !voter(id) && !learner(id) => Err(format!(
                "node {id} is not a member (voters {:?}, learners {:?})",
                conf.voters, conf.learners
            )),
            MembershipChange::AddLearner { id, .. } if voter(id) => Err(format!(
                "node {id} is a voter: adding it as a learner would demote it (remove it first)"
            )),
            MembershipChange::AddLearner { id, .. } if learner(id) => {
                Err(format!("node {id} is already a learner"))
            }
            MembershipChange::AddVoter { id, .. } if voter(id) => {
                Err(format!("node {id} is already a voter"))
            }
            MembershipChange::AddVoter { id, addr } if learner(id) => {
                let recorded = self.machine.members().map_err(|e| e.to_string())?;
                match recorded.iter().find(|(m, _)| m == id) {
                    Some((_, at)) if at != addr => Err(format!(
                        "node {id} is a learner at {at}, not {addr}: promote it at that \
                         address, or remove it and add it again"
                    )),
                    _ => self.check_quorum_after(change),
                }
            }
            MembershipChange::AddVoter { .. } | MembershipChange::Remove { .. } => {
                self.check_quorum_after(change)
            }
            MembershipChange::AddLearner { .. } => Ok(()),
        }
    }

    /// Those of `voters` that answer this leader now: itself, and those
    /// that answered its appends or heartbeats within an election timeout.
    fn answering(&self, voters: &[u64]) -> Vec<u64> {
        let now = self.time.now();
        voters
            .iter()
            .copied()
            .filter(|&v| {
                v == self.id
                    || self
                        .last_heard
                        .get(&v)
                        .is_some_and(|at| now.duration_since(*at) < self.election_timeout)
            })
            .collect()
    }

    /// Refuses a change after which the voters that answer now could not
    /// commit: the change itself commits under the old configuration, and
    /// then nothing would, not even its undo. A voter added that cannot
    /// answer (down, at a wrong address, or still catching up) raises the
    /// quorum; removing a live voter while another is down lowers the
    /// count that answers. A voter answers if it answered this leader's
    /// appends or heartbeats within an election timeout, and a promoted
    /// learner only once the leader replicates to it entry by entry and it
    /// is within [`PROMOTE_LAG`] entries of the log's end.
    fn check_quorum_after(&self, change: &MembershipChange) -> Result<(), String> {
        let last_index = self.raw.raft.raft_log.last_index();
        let mut voters = self.raw.store().conf_state().voters.clone();
        let (what, undo, promoted) = match change {
            MembershipChange::AddVoter { id, .. } => {
                voters.push(*id);
                (
                    format!("adding node {id} as a voter"),
                    "add it as a learner first, and promote it once it has caught up",
                    Some(*id),
                )
            }
            MembershipChange::Remove { id } => {
                voters.retain(|v| v != id);
                (
                    format!("removing node {id}"),
                    "bring the voters that do not answer back first",
                    None,
                )
            }
            MembershipChange::AddLearner { .. } => return Ok(()),
        };
        let answering: Vec<u64> = self
            .answering(&voters)
            .into_iter()
            .filter(|&v| {
                Some(v) != promoted
                    || self.raw.raft.prs().get(v).is_some_and(|p| {
                        p.state == ::raft::ProgressState::Replicate
                            && p.matched + PROMOTE_LAG >= last_index
                    })
            })
            .collect();
        let quorum = voters.len() / 2 + 1;
        if answering.len() >= quorum {
            return Ok(());
        }
        voters.sort_unstable();
        Err(format!(
            "{what} would leave voters {voters:?} needing {quorum} to commit, and only \
             {answering:?} answer now (within an election timeout, caught up): {undo}"
        ))
    }

    /// Keeps this node's Snowflake worker id and time fence current. Any
    /// node proposes these (raft-rs forwards a follower's proposal to the
    /// leader); they take effect when applied.
    fn snowflake_tick(&mut self, now: Instant) {
        let (worker, active, headroom, next, steps, ahead, awaits) = {
            let mut issuer = self.ids.lock();
            let mono = self.ids.clock.mono_ms();
            let now = issuer.time_ms(self.ids.clock.now_ms(), mono);
            (
                issuer.worker(),
                issuer.is_active(),
                issuer.headroom_ms(now),
                issuer.next_fence(now, self.snowflake.fence_ahead_ms),
                issuer.take_forward_steps(),
                issuer.ahead_of_cluster(now, mono),
                issuer.awaits_cluster(mono),
            )
        };
        for step in steps {
            self.report_forward_step(step);
        }
        self.report_ahead_of_cluster(now, ahead);
        if self.raw.raft.leader_id == 0 {
            return;
        }
        let cs = self.raw.store().conf_state();
        if !cs.voters.contains(&self.id) && !cs.learners.contains(&self.id) {
            return;
        }
        let retry = Duration::from_millis(500);
        let due = |sent: Option<Instant>| sent.is_none_or(|t| now.duration_since(t) > retry);
        let cmd = match worker {
            None if due(self.acquire_sent) => {
                self.acquire_sent = Some(now);
                command::Kind::AcquireWorker(AcquireWorker {
                    node_id: self.id,
                    max_workers: self.max_workers,
                })
            }
            // Not while this node's time is past the cluster's (the fence
            // would reach ahead of every other node's, and once its clock
            // is set right the node would wait it out), nor before it can
            // tell.
            Some(worker)
                if (!active || headroom < self.snowflake.renew_before_ms as i64)
                    && ahead.is_none()
                    && !awaits
                    && due(self.renew_sent) =>
            {
                self.renew_sent = Some(now);
                command::Kind::RenewFence(RenewFence {
                    node_id: self.id,
                    worker,
                    fence_ms: next,
                    boot: self.boot,
                })
            }
            _ => return,
        };
        metrics::counter!(m::RAFT_PROPOSALS_TOTAL, "kind" => match &cmd {
            command::Kind::AcquireWorker(_) => "acquire_worker",
            _ => "renew_fence",
        })
        .increment(1);
        // Not tracked: a follower cannot know the index its proposal gets;
        // the outcome is recognised by node id (and boot) when it applies.
        let data = Command { kind: Some(cmd) }.encode_to_vec();
        if let Err(e) = self.raw.propose(Vec::new(), data) {
            tracing::debug!(error = %e, "snowflake proposal dropped; will retry");
        }
    }

    /// Logs when this node's time has been past the latest fence another
    /// node committed, by more than allowed, for [`AHEAD_REPORTED_AFTER`],
    /// and when it is back; the gauge says how far (0 otherwise). Not
    /// sooner: a node catching up on the log after a restart reads the
    /// other nodes' fences from before it stopped for a moment.
    fn report_ahead_of_cluster(&mut self, now: Instant, ahead: Option<u64>) {
        self.ahead_of_cluster_ms = ahead.unwrap_or(0);
        let (since, reported) = match (ahead, self.ahead_of_cluster) {
            (None, None) => return,
            (None, Some((_, reported))) => {
                self.ahead_of_cluster = None;
                if reported {
                    metrics::gauge!(m::CLOCK_AHEAD_OF_CLUSTER_SECONDS).set(0.0);
                    tracing::info!(
                        node_id = self.id,
                        "this node's clock agrees with the cluster's again: issuing IDs"
                    );
                }
                return;
            }
            (Some(_), None) => (now, false),
            (Some(_), Some(state)) => state,
        };
        let ahead_ms = ahead.unwrap_or(0);
        let due = now.duration_since(since) >= AHEAD_REPORTED_AFTER;
        self.ahead_of_cluster = Some((since, reported || due));
        if reported || due {
            metrics::gauge!(m::CLOCK_AHEAD_OF_CLUSTER_SECONDS).set(ahead_ms as f64 / 1000.0);
        }
        if due && !reported {
            tracing::error!(
                node_id = self.id,
                ahead_ms,
                limit_ms = self.snowflake.max_ahead_of_cluster_ms,
                "this node's clock is past the latest time fence another node committed: \
                 it issues no IDs and renews no fence until the clocks agree (fix this \
                 node's clock, or the others' if they are behind)"
            );
        }
    }

    fn report_forward_step(&self, step: ForwardStep) {
        let trust_ms = self.snowflake.trust_forward_step_ms;
        let outcome = match step {
            ForwardStep::Held { by_ms } => {
                tracing::warn!(
                    node_id = self.id,
                    by_ms,
                    trust_ms,
                    "clock stepped forward: IDs and fences go on from before the step until \
                     it has held for trust_ms"
                );
                "held"
            }
            ForwardStep::Believed { by_ms } => {
                tracing::warn!(
                    node_id = self.id,
                    by_ms,
                    trust_ms,
                    "clock step forward believed"
                );
                "believed"
            }
            ForwardStep::Undone { by_ms } => {
                tracing::info!(
                    node_id = self.id,
                    by_ms,
                    "clock step forward undone before it was believed: nothing followed it"
                );
                "undone"
            }
        };
        metrics::counter!(m::CLOCK_FORWARD_STEPS_TOTAL, "outcome" => outcome).increment(1);
    }

    /// Answers the proposals settled by the entry at `index`. Returns
    /// whether keys that calls may wait on serve again (a release settled).
    fn resolve_proposals(&mut self, index: u64, term: u64, outcome: &Applied) -> bool {
        let mut released = false;
        while let Some(entry) = self.proposals.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (pindex, (pterm, what)) = entry.remove_entry();
            let ours = pindex == index && pterm == term;
            match what {
                Proposal::Raises(waiters) => {
                    for mut w in waiters {
                        let result = if ours {
                            Ok(Grant {
                                ranges: std::mem::take(&mut w.ranges),
                                epoch: self.core.epoch(),
                                replayed: false,
                            })
                        } else {
                            Err(NodeError::NotLeader {
                                leader: self.leader_hint(),
                            })
                        };
                        self.settle_dense(w, result);
                    }
                }
                Proposal::LeaderStart => {
                    if let (true, Applied::LeaderStarted { epoch, .. }) = (ours, outcome) {
                        if self.stopped_for_handover() {
                            // Proposed before the trim began: a handover
                            // asked for before this leader's start entry
                            // applied, or after a dropped raise had it
                            // start anew. The trim decides what follows,
                            // and every way out of it that keeps leading
                            // starts serving itself (see
                            // `check_handover_deadline`). Serving now
                            // would only show in status and health: calls
                            // are refused (`accept`). The simulation hit
                            // this state (the assertion in `on_tick`).
                            tracing::info!(
                                node_id = self.id,
                                term,
                                epoch,
                                "leader start applied during a handover's trim; not serving"
                            );
                        } else {
                            self.core.start_serving(*epoch);
                            tracing::info!(node_id = self.id, term, epoch, "leader serving");
                        }
                    }
                }
                Proposal::Trim { last, handover } => {
                    let current = self.handover.as_ref().is_some_and(|h| h.id == handover);
                    if ours && current && last {
                        self.transfer_after_trim(true);
                    } else if ours && current {
                        self.trim_part_applied();
                    }
                }
                Proposal::Release(keys) => {
                    // Applied (the released keys have left memory), refused
                    // by the state machine, or lost: the rest serve again.
                    self.core.end_release(&keys);
                    released = true;
                }
                Proposal::ConfChange(reply) => {
                    let result = match (ours, outcome) {
                        (true, Applied::ConfChange(_)) => {
                            let cs = self.raw.store().conf_state();
                            Ok(Membership {
                                voters: cs.voters.clone(),
                                learners: cs.learners.clone(),
                            })
                        }
                        (true, Applied::ConfChangeRefused(_)) => Err(NodeError::Membership(
                            "raft-rs refused the change when it applied; nothing changed (the \
                             node's log says why)"
                                .into(),
                        )),
                        (true, _) => Err(NodeError::Membership(
                            "another membership change is in progress; retry".into(),
                        )),
                        (false, _) => Err(NodeError::NotLeader {
                            leader: self.leader_hint(),
                        }),
                    };
                    let _ = reply.send(result);
                }
            }
        }
        released
    }

    fn maybe_compact(&mut self) -> Result<(), StorageError> {
        let applied = self.machine.applied();
        let compacted = self.raw.store().compacted_index();
        if !compaction_due(applied, compacted, self.compact_threshold) {
            return Ok(());
        }
        // Keep a short tail so a follower slightly behind catches up from
        // the log rather than a snapshot.
        let mut upto = applied - self.compact_threshold / 10;
        if let Some(hold) = self.snapshot_hold(applied) {
            upto = upto.min(hold);
        }
        self.raw.mut_store().compact(upto)?;
        tracing::debug!(node_id = self.id, upto, "log compacted");
        Ok(())
    }

    /// The index compaction must keep the entries after, for a snapshot
    /// being built or sent: its follower needs them once it has installed
    /// it, and a snapshot built and sent again as each went stale would
    /// never let a follower catch up under load. Kept while being built;
    /// then while a follower that answers has not reached it, or one it
    /// was sent to may still be installing it; up to a bound. A member
    /// that is down keeps nothing: it gets a newer snapshot when back.
    fn snapshot_hold(&mut self, applied: u64) -> Option<u64> {
        let (index, building) = self.raw.store().snapshot_hold()?;
        if building {
            return Some(index);
        }
        let now = self.time.now();
        let limit = SNAPSHOT_HOLD_MAX_ENTRIES.max(10 * self.compact_threshold);
        let sent = &self.snapshot_sent;
        let needed = self.raw.raft.state == StateRole::Leader
            && self.raw.raft.prs().iter().any(|(id, pr)| {
                // Past the snapshot, a follower back in Probe gets one
                // append at a time, from its index on.
                *id != self.id
                    && (pr.matched < index || pr.state != ::raft::ProgressState::Replicate)
                    // A snapshot on its way to it (its report decides what
                    // next): `recent_active` alone, which raft-rs clears
                    // every election timeout until the next answer, let a
                    // compaction in between drop the snapshot being sent,
                    // and the follower needed a second one.
                    && (pr.recent_active
                        || pr.state == ::raft::ProgressState::Snapshot
                        || sent
                            .get(id)
                            .is_some_and(|(i, until)| *i == index && now < *until))
            });
        if needed && applied.saturating_sub(index) <= limit {
            Some(index)
        } else {
            self.raw.store().drop_snapshot();
            self.snapshot_sent.clear();
            None
        }
    }

    fn check_role(&mut self) {
        let leader_now = self.raw.raft.state == StateRole::Leader;
        let term = self.raw.raft.term;
        match (self.core.role(), leader_now) {
            (Role::Leader { term: t, .. }, true) if t == term => {
                if self.leader_start.is_none() {
                    self.propose_leader_start(term);
                }
            }
            (_, true) => {
                self.fail_all(NodeError::NotLeader { leader: None });
                // Answers to an earlier term's leadership do not count.
                self.last_heard.clear();
                self.core.become_leader(term);
                tracing::info!(node_id = self.id, term, "became leader");
                self.propose_leader_start(term);
            }
            (Role::Leader { .. }, false) => {
                self.core.step_down();
                let hint = self.leader_hint();
                self.fail_all(NodeError::NotLeader { leader: hint });
                tracing::info!(node_id = self.id, term, "stepped down");
            }
            (Role::Follower, false) => {}
        }
        let leader = self.raw.raft.leader_id;
        if leader != self.last_leader {
            tracing::info!(
                node_id = self.id,
                term,
                leader_id = leader,
                "leader changed"
            );
            // Counted when a leader is known again: a failover passes
            // through "no leader" (0) on the way, one change, not two.
            if leader != 0 {
                metrics::counter!(m::RAFT_LEADER_CHANGES_TOTAL).increment(1);
            }
            self.last_leader = leader;
        }
    }

    fn propose_leader_start(&mut self, term: u64) {
        let cmd = Command {
            kind: Some(command::Kind::LeaderStart(LeaderStart {
                term,
                node_id: self.id,
            })),
        };
        if let Ok(index) = self.propose(cmd, Proposal::LeaderStart) {
            self.leader_start = Some(index);
        }
    }

    fn begin_handover(
        &mut self,
        to: Option<u64>,
        reply: Option<Reply<()>>,
        exit: Option<oneshot::Sender<()>>,
    ) {
        // raft-rs may have made this node leader earlier in this batch of
        // inputs, which the allocator learns only in `round`: there, its
        // new leadership fails every pending proposal, the handover's trim
        // among them, and the handover waited for that trim for good
        // (the node leading without serving, the transfer unanswered).
        self.check_role();
        if self.raw.raft.state != StateRole::Leader {
            if let Some(r) = reply {
                let _ = r.send(Err(NodeError::NotLeader {
                    leader: self.leader_hint(),
                }));
            }
            if let Some(e) = exit {
                let _ = e.send(());
            }
            return;
        }
        if let Some(t) = to {
            let voters = &self.raw.store().conf_state().voters;
            let why = if t == self.id {
                Some(format!("node {t} leads already"))
            } else if !voters.contains(&t) {
                Some(format!("node {t} is not a voter (voters: {voters:?})"))
            } else {
                None
            };
            // Refused before anything stops: raft-rs would ignore such a
            // transfer, and the trim would stop serving until the deadline.
            // (Only an operator's transfer names a target; a shutdown's
            // handover picks one.)
            if let Some(why) = why {
                if let Some(r) = reply {
                    let _ = r.send(Err(NodeError::Membership(format!(
                        "cannot transfer leadership: {why}"
                    ))));
                }
                return;
            }
        }
        if let Some(h) = self.handover.as_mut() {
            if let Some(r) = reply {
                let _ = r.send(Err(NodeError::Membership(
                    "a leadership transfer is already in progress".into(),
                )));
            }
            // A shutdown joins the running handover instead of being lost.
            if exit.is_some() {
                h.exit = exit;
            }
            return;
        }
        let held = self.core.active_keys();
        let releasing = held > self.trim_part_keys;
        self.handovers_begun += 1;
        let now = self.time.now();
        self.handover = Some(Handover {
            id: self.handovers_begun,
            term: self.raw.raft.term,
            to,
            started: now,
            keys_at_start: held,
            released: 0,
            trim_keys: 0,
            phase: if releasing {
                HandoverPhase::Releasing {
                    looked: 0,
                    of: held,
                    in_flight: None,
                    window: ReleaseWindow::default(),
                }
            } else {
                HandoverPhase::Trimming
            },
            deadline: now + self.election_timeout * 2,
            reply,
            exit,
            untrimmed: Vec::new(),
            parts_in_flight: 0,
            last_part_proposed: false,
        });
        if releasing {
            tracing::info!(
                node_id = self.id,
                keys = held,
                idle_ms = self.handover_idle_ms,
                "handing over: releasing idle keys first, serving meanwhile"
            );
            self.release_before_handover();
        } else {
            self.stop_and_trim();
        }
    }

    /// The handover's first phase, while serving: releases the keys idle
    /// for [`HANDOVER_IDLE_MS`], a window of the keys at a time in key
    /// order, one release entry in flight (a key used since the window was
    /// taken stays). After one pass over the keys held when it began, it
    /// stops serving and trims the rest.
    fn release_before_handover(&mut self) {
        let term = self.raw.raft.term;
        let serving = self.raw.raft.state == StateRole::Leader
            && matches!(self.core.role(), Role::Leader { term: t, serving: true } if t == term);
        let Some(h) = self.handover.as_mut() else {
            return;
        };
        let HandoverPhase::Releasing {
            mut looked,
            of,
            in_flight,
            ref mut window,
        } = h.phase
        else {
            return;
        };
        // As the leader of the handover's term only (a proposal as a
        // follower is forwarded to the leader); the handover ends after
        // this round if that term is over. Not serving (a proposal was
        // dropped, see `serve_after_a_new_start`) releases nothing either:
        // the deadline then moves on to the trim.
        if !serving || h.term != term {
            return;
        }
        if in_flight.is_some_and(|index| self.proposals.contains_key(&index)) {
            return;
        }
        let mut window = std::mem::take(window);
        let now = self.time.now();
        let now_ms = self.now_ms();
        let idle_ms = self.handover_idle_ms;
        let slice = HANDOVER_RELEASE_KEYS.min(self.trim_part_keys);
        let mut batch = Vec::new();
        if !window.full {
            // A chunk of the window a round, so that a round among many
            // keys is not a walk over all of them.
            let started = std::time::Instant::now();
            let mut found = Vec::new();
            let mut chunk = 0;
            while looked < of && chunk < HANDOVER_RELEASE_CHUNK {
                found.extend(self.core.idle_keys_for(now_ms, slice, idle_ms));
                looked += slice;
                chunk += slice;
            }
            window.add_run(found, chunk);
            window.slowest = window.slowest.max(started.elapsed());
            window.full = window.looked >= HANDOVER_RELEASE_WINDOW || looked >= of;
            if window.full {
                tracing::info!(
                    node_id = self.id,
                    looked = looked.min(of),
                    of,
                    idle = window.len(),
                    slowest_round_ms = window.slowest.as_millis() as u64,
                    "handing over: releasing the next window of idle keys"
                );
            }
        } else {
            batch = window.take(slice);
            if window.runs.is_empty() {
                window = ReleaseWindow::default();
            }
        }
        let releases = self.core.take_releases_of(now_ms, &batch, idle_ms);
        let count = releases.len();
        let in_flight = if releases.is_empty() {
            None
        } else {
            self.propose_releases(releases)
        };
        let deadline = now + self.election_timeout * 2;
        let done = in_flight.is_none() && window.runs.is_empty() && looked >= of;
        if let Some(h) = self.handover.as_mut() {
            h.phase = HandoverPhase::Releasing {
                looked,
                of,
                in_flight,
                window,
            };
            h.deadline = deadline;
            if in_flight.is_some() {
                h.released += count;
            }
        }
        if done {
            self.stop_and_trim();
        }
    }

    /// Stops serving and trims every key still held (see [`Handover`]).
    fn stop_and_trim(&mut self) {
        // No lease from now on: the transfer may let the target campaign.
        self.lease_until = None;
        let trim = self.core.begin_trim();
        let hint = self
            .handover
            .as_ref()
            .and_then(|h| h.to)
            .or(self.best_follower());
        // Calls not yet answered go to the next leader.
        for call in self.unconfirmed.drain(..).chain(self.waiting.drain(..)) {
            call.fail(NodeError::NotLeader { leader: hint });
        }
        for (_, _, calls) in self.reads.drain(..) {
            for call in calls {
                call.fail(NodeError::NotLeader { leader: hint });
            }
        }
        // Dense reservations made in this round, before the handover began,
        // and not yet proposed: with serving stopped they never will be,
        // and every way out of the handover forgets the allocator's memory
        // before this node serves again (`reset_allocator`), so their
        // numbers were never handed out. Their calls go on at once rather
        // than waiting for the trim and the transfer.
        for w in std::mem::take(&mut self.dense_pending) {
            self.settle_dense(w, Err(NodeError::NotLeader { leader: hint }));
        }
        tracing::info!(
            node_id = self.id,
            keys = trim.len(),
            parts = trim.len().div_ceil(self.trim_part_keys).max(1),
            "handing over: trimming"
        );
        let deadline = self.time.now() + self.election_timeout * 2;
        if let Some(h) = self.handover.as_mut() {
            h.phase = HandoverPhase::Trimming;
            h.deadline = deadline;
            h.trim_keys = trim.len();
            h.untrimmed = trim;
        }
        self.propose_trim_parts();
    }

    /// Proposes the handover's next parts of its trim, up to
    /// [`TRIM_PARTS_IN_FLIGHT`] not yet applied. The last part (the only
    /// one if every key fits in it, even none) is marked as such: only it
    /// makes the hand-off clean.
    fn propose_trim_parts(&mut self) {
        let term = self.raw.raft.term;
        let leading = self.raw.raft.state == StateRole::Leader;
        // The last part makes the hand-off clean: the next leader keeps
        // the epoch. So it follows every raise this leader proposed,
        // applied here and so answered: a dense call's numbers are handed
        // out when its raise applies, and a raise that commits while this
        // node, cut off or behind on its own log, answers nothing would
        // leave a hole the epoch does not announce. (Nothing new is raised:
        // serving stopped with the trim.)
        let raising = self.handover.is_some()
            && self
                .proposals
                .values()
                .any(|(_, p)| matches!(p, Proposal::Raises(_)));
        loop {
            let Some(h) = self.handover.as_mut() else {
                return;
            };
            // Only as the leader of the handover's term: raft-rs forwards a
            // follower's proposal to the leader, whose term it would join.
            // (The handover ends after this round: `handover_done`.)
            if !leading
                || h.term != term
                || !matches!(h.phase, HandoverPhase::Trimming)
                || h.last_part_proposed
                || h.parts_in_flight >= TRIM_PARTS_IN_FLIGHT
            {
                return;
            }
            let from = next_part(&h.untrimmed, self.trim_part_keys, TRIM_PART_BYTES);
            if from == 0 && raising {
                return;
            }
            let mut part = h.untrimmed.split_off(from);
            // In key order, as releases are (see `propose_releases`).
            part.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            let last = h.untrimmed.is_empty();
            h.parts_in_flight += 1;
            h.last_part_proposed = last;
            let handover = h.id;
            let cmd = Command {
                kind: Some(command::Kind::Trim(Trim {
                    keys: self.key_ceilings(&part),
                    term,
                    more: !last,
                })),
            };
            self.trim_parts += 1;
            if self
                .propose(cmd, Proposal::Trim { last, handover })
                .is_err()
            {
                // Parts already in the log may still commit: serving again
                // needs a new start (see `check_handover_deadline`).
                self.transfer_after_trim(false);
                return;
            }
        }
    }

    /// A part of the trim (not the last) applied: the handover gets its
    /// time again, and room for the next part, which the round proposes
    /// after the Ready (a proposal while a Ready is out would append an
    /// entry it does not name, and raft-rs panics when it is persisted).
    fn trim_part_applied(&mut self) {
        let now = self.time.now();
        let Some(h) = self.handover.as_mut() else {
            return;
        };
        if !matches!(h.phase, HandoverPhase::Trimming) {
            return;
        }
        h.parts_in_flight = h.parts_in_flight.saturating_sub(1);
        h.deadline = now + self.election_timeout * 2;
    }

    fn best_follower(&self) -> Option<u64> {
        let voters = &self.raw.store().conf_state().voters;
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != self.id && voters.contains(id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id)
    }

    fn transfer_after_trim(&mut self, trimmed: bool) {
        let target = self
            .handover
            .as_ref()
            .and_then(|h| h.to)
            .or(self.best_follower());
        let Some(h) = self.handover.as_mut() else {
            return;
        };
        h.phase = HandoverPhase::Transferring { trimmed };
        match target {
            Some(t) => {
                tracing::info!(
                    node_id = self.id,
                    to = t,
                    "handing over: transferring leadership"
                );
                self.lease_forbidden_term = self.raw.raft.term;
                self.lease_until = None;
                // The transfer gets its whole time from here: raft-rs gives
                // it up after an election timeout, and a handover that
                // gave up first (after a slow trim) would serve again while
                // the target may still be told to campaign.
                h.deadline = self.time.now() + self.election_timeout * 2;
                self.raw.transfer_leader(t);
            }
            // Single voter: nobody to hand to; the trim alone avoids holes.
            None => h.deadline = self.time.now(),
        }
    }

    /// Ends a handover once this node no longer leads (the term it
    /// started in is over, whatever phase it reached).
    fn handover_done(&mut self) -> Option<oneshot::Sender<()>> {
        let h = self.handover.as_ref()?;
        let same_term = matches!(self.core.role(), Role::Leader { term, .. } if term == h.term);
        if self.raw.raft.state == StateRole::Leader && same_term {
            return None;
        }
        let h = self.handover.take()?;
        if let Some(r) = h.reply {
            let result = match h.phase {
                HandoverPhase::Transferring { .. } => Ok(()),
                HandoverPhase::Releasing { .. } | HandoverPhase::Trimming => {
                    Err(NodeError::NotLeader {
                        leader: self.leader_hint(),
                    })
                }
            };
            let _ = r.send(result);
        }
        h.exit
    }

    /// A handover that ran out of time: stop anyway, or resume serving.
    fn check_handover_deadline(&mut self, now: Instant) -> Option<oneshot::Sender<()>> {
        let h = self.handover.as_mut()?;
        if h.deadline > now {
            return None;
        }
        if matches!(h.phase, HandoverPhase::Releasing { .. }) {
            // No release settled for a while (or none could be proposed):
            // on to the trim, which covers whatever is still held.
            self.stop_and_trim();
            return None;
        }
        if matches!(h.phase, HandoverPhase::Trimming) && h.exit.is_none() {
            // The trim may still commit, lowering ceilings: serving again
            // before it resolves could hand out numbers above them. Keep
            // waiting; losing leadership ends the handover too.
            h.deadline = now + self.election_timeout;
            return None;
        }
        let h = self.handover.take()?;
        if let Some(r) = h.reply {
            let _ = r.send(Err(NodeError::Timeout(now.duration_since(h.started))));
        }
        if h.exit.is_some() {
            return h.exit;
        }
        if self.raw.raft.state == StateRole::Leader {
            // No target is told to campaign from now on (one told already
            // may still campaign: no lease in this term, see
            // `lease_forbidden_term`).
            self.raw.raft.abort_leader_transfer();
            if matches!(h.phase, HandoverPhase::Transferring { trimmed: true }) {
                // The trim lowered ceilings to what was used; the memory of
                // the old segments must go before serving again.
                self.reset_allocator();
                let epoch = self.machine.epoch();
                self.core.start_serving(epoch);
                tracing::warn!(node_id = self.id, "handover timed out; serving again");
            } else {
                // Keys reloaded now could start below a raise still in
                // the log: serving waits for a new start-of-term entry,
                // which applies after it (and opens a new epoch: the
                // forgotten segments leave holes).
                self.serve_after_a_new_start();
                tracing::warn!(
                    node_id = self.id,
                    "handover timed out with its trim dropped; serving after a new start"
                );
            }
        }
        None
    }

    /// The lease a completed round grants: this node's own, cut to the
    /// shortest vote promise a voter named (its timing may differ from
    /// this node's: see [`PeerPromises`]).
    fn lease_now(&self, own: Duration) -> Duration {
        let voters = &self.raw.store().conf_state().voters;
        let others = voters.iter().copied().filter(|v| *v != self.id);
        match self.peer_promises.shortest(others) {
            Some(promise) => own.min(promise * LEASE_NUM / LEASE_DEN),
            None => own,
        }
    }

    fn export_gauges(&self) {
        if let Some(own) = self.lease {
            metrics::gauge!(m::LEASE_SECONDS).set(self.lease_now(own).as_secs_f64());
        }
        let raft = &self.raw.raft;
        metrics::gauge!(m::RAFT_TERM).set(raft.term as f64);
        metrics::gauge!(m::RAFT_IS_LEADER).set(if raft.state == StateRole::Leader {
            1.0
        } else {
            0.0
        });
        metrics::gauge!(m::RAFT_COMMIT_INDEX).set(raft.raft_log.committed as f64);
        metrics::gauge!(m::RAFT_APPLIED_INDEX).set(self.machine.applied() as f64);
        metrics::gauge!(m::ACTIVE_KEYS).set(self.core.active_keys() as f64);
        let handover = self.handover.as_ref().map(|h| self.handover_progress(h));
        let (phase, seconds, released) = handover.map_or((0.0, 0.0, 0.0), |h| {
            let phase = match h.phase {
                HandoverStage::Releasing => 1.0,
                HandoverStage::Trimming => 2.0,
                HandoverStage::Transferring => 3.0,
            };
            (phase, h.elapsed.as_secs_f64(), h.keys_released as f64)
        });
        metrics::gauge!(m::HANDOVER_PHASE).set(phase);
        metrics::gauge!(m::HANDOVER_SECONDS).set(seconds);
        metrics::gauge!(m::HANDOVER_KEYS_RELEASED).set(released);
        let sync_wait = self.sync_since.map_or(0.0, |since| {
            self.time
                .now()
                .saturating_duration_since(since)
                .as_secs_f64()
        });
        metrics::gauge!(m::RAFT_SYNC_PENDING_SECONDS).set(sync_wait);
        let mut issuer = self.ids.lock();
        let now = issuer.time_ms(self.ids.clock.now_ms(), self.ids.clock.mono_ms());
        // 0 while the node cannot issue (no worker id, or waiting for its
        // own fence), rather than the last value it had.
        let headroom = if issuer.is_active() {
            issuer.headroom_ms(now) as f64 / 1000.0
        } else {
            0.0
        };
        metrics::gauge!(m::FENCE_HEADROOM_SECONDS).set(headroom);
        metrics::gauge!(m::LAYOUT_YEARS_LEFT).set(issuer.layout().years_left(now));
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let store = self.raw.store();
        let (worker, ids_active, fence_ms) = {
            let issuer = self.ids.lock();
            // A node whose clock runs past the cluster's refuses IDs though
            // its worker is active: not serving them (gRPC health too).
            let active = issuer.is_active() && self.ahead_of_cluster.is_none();
            (issuer.worker(), active, issuer.fence_ms())
        };
        NodeStatus {
            id: self.id,
            role: format!("{:?}", self.raw.raft.state),
            term: self.raw.raft.term,
            leader_id: self.raw.raft.leader_id,
            commit_index: self.raw.raft.raft_log.committed,
            applied_index: self.machine.applied(),
            first_index: store.first_index().unwrap_or_default(),
            last_index: store.last_index().unwrap_or_default(),
            compacted_index: store.compacted_index(),
            epoch: self.machine.epoch(),
            serving: self.core.is_serving(),
            active_keys: self.core.active_keys() as u64,
            voters: store.conf_state().voters.clone(),
            learners: store.conf_state().learners.clone(),
            snapshots_installed: self.snapshots_installed,
            worker,
            ids_active,
            fence_ms,
            peer_clocks: self.peer_clocks.all(),
            ahead_of_cluster_ms: self.ahead_of_cluster_ms,
            answering: if self.raw.raft.state == StateRole::Leader {
                self.answering(&store.conf_state().voters)
            } else {
                Vec::new()
            },
            handover: self.handover.as_ref().map(|h| self.handover_progress(h)),
        }
    }

    fn handover_progress(&self, h: &Handover) -> HandoverProgress {
        let (phase, looked) = match &h.phase {
            HandoverPhase::Releasing { looked, of, .. } => {
                (HandoverStage::Releasing, (*looked).min(*of))
            }
            HandoverPhase::Trimming => (HandoverStage::Trimming, h.keys_at_start),
            HandoverPhase::Transferring { .. } => (HandoverStage::Transferring, h.keys_at_start),
        };
        HandoverProgress {
            phase,
            elapsed: self.time.now().saturating_duration_since(h.started),
            keys_at_start: h.keys_at_start as u64,
            keys_looked_at: looked as u64,
            keys_released: h.released as u64,
            trim_keys: h.trim_keys as u64,
            trim_keys_left: h.untrimmed.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::Overrides;

    /// The namespaces of the embedded single-node configuration.
    fn embedded_namespaces() -> Namespaces {
        Config::load(None, &Overrides::default())
            .unwrap()
            .namespaces()
    }

    /// A release window's runs, each sorted as it was gathered, are taken
    /// merged: in key order across all of them.
    #[test]
    fn a_release_window_hands_out_its_keys_in_key_order() {
        let namespaces = embedded_namespaces();
        let ns = namespaces.resolve("conv").unwrap();
        let key = |i: u32| SeqKey::try_new(&namespaces, ns, format!("k{i:03}")).unwrap();
        let mut w = ReleaseWindow::default();
        w.add_run(vec![key(5), key(1), key(9)], 100);
        w.add_run(Vec::new(), 100);
        w.add_run(vec![key(2), key(8), key(3), key(7)], 100);
        w.add_run(vec![key(6), key(4)], 100);
        assert_eq!((w.len(), w.runs.len(), w.looked), (9, 3, 400));
        assert_eq!(w.take(4), (1..=4).map(key).collect::<Vec<_>>());
        assert_eq!(w.take(4), (5..=8).map(key).collect::<Vec<_>>());
        assert_eq!(w.take(4), vec![key(9)]);
        assert!(w.runs.is_empty());
        assert!(w.take(4).is_empty());
    }

    /// A part of a trim holds at most its count of keys, fewer once their
    /// names reach its bytes (long keys), and always at least one key.
    #[test]
    fn a_trim_part_is_bounded_by_keys_and_by_bytes() {
        let namespaces = embedded_namespaces();
        let ns = namespaces.resolve("conv").unwrap();
        let raise = |name: String| DenseRaise {
            key: SeqKey::try_new(&namespaces, ns, name).unwrap(),
            ceiling: 1,
        };
        let short: Vec<DenseRaise> = (0..25).map(|i| raise(format!("k{i:02}"))).collect();
        assert_eq!(next_part(&short, 10, 1 << 20), 15, "ten short keys");
        assert_eq!(next_part(&short[..4], 10, 1 << 20), 0, "the four left");
        let long: Vec<DenseRaise> = (0..25)
            .map(|i| raise(format!("{i:02}{}", "x".repeat(174))))
            .collect();
        // 176 + 24 bytes a key: the part stops at the key that reaches 1,000.
        assert_eq!(next_part(&long, 10, 1_000), 20, "five long keys");
        assert_eq!(next_part(&long, 10, 1), 24, "one key, however long");
        assert_eq!(next_part(&[], 10, 1_000), 0);
    }

    /// The items' hash goes into the log and is compared by other nodes,
    /// maybe other builds: it must not change.
    #[test]
    fn items_hash_is_a_fixed_function_of_keys_and_counts() {
        let namespaces = embedded_namespaces();
        let ns = namespaces.resolve("conv").unwrap();
        let key = |k: &str| SeqKey::try_new(&namespaces, ns, k.to_string()).unwrap();
        let items = [(key("conv-1"), 1), (key("x"), 300)];
        assert_eq!(items_hash(&items), 0xa301_55ef_1ce4_f072);
        let swapped = [(key("x"), 300), (key("conv-1"), 1)];
        assert_ne!(items_hash(&items), items_hash(&swapped));
        let moved = [(key("conv-"), 1), (key("1x"), 300)];
        assert_ne!(items_hash(&items), items_hash(&moved));
        assert_ne!(items_hash(&items), items_hash(&items[..1]));
    }

    /// The leader's own records tell apart what FNV-1a tells apart, and
    /// stay the same for the same items.
    #[test]
    fn recent_records_hash_keys_counts_and_order() {
        let namespaces = embedded_namespaces();
        let ns = namespaces.resolve("conv").unwrap();
        let key = |k: &str| SeqKey::try_new(&namespaces, ns, k.to_string()).unwrap();
        let recent = RecentRequests::default();
        let items = [(key("conv-1"), 1), (key("x"), 300)];
        let again = [(key("conv-1"), 1), (key("x"), 300)];
        assert_eq!(recent.items_hash(&items), recent.items_hash(&again));
        for other in [
            &[(key("x"), 300), (key("conv-1"), 1)][..],
            &[(key("conv-"), 1), (key("1x"), 300)],
            &[(key("conv-1"), 1), (key("x"), 301)],
            &items[..1],
            &[(key("a-key-longer-than-22-bytes"), 1), (key("x"), 300)],
        ] {
            assert_ne!(
                recent.items_hash(&items),
                recent.items_hash(other),
                "{other:?}"
            );
        }
    }

    fn normal(index: u64, len: usize) -> Entry {
        Entry {
            index,
            data: vec![7; len].into(),
            ..Default::default()
        }
    }

    /// Short applies of normal entries stay on the loop's thread, even one
    /// that makes a compaction due (not synced); a configuration change or
    /// a long batch leaves it.
    #[test]
    fn only_short_plain_applies_stay_on_the_loop() {
        assert!(!apply_leaves_loop(&[]));
        assert!(!apply_leaves_loop(&[normal(5, 700), normal(6, 0)]));
        let mut conf = normal(6, 20);
        conf.set_entry_type(EntryType::EntryConfChangeV2);
        assert!(apply_leaves_loop(&[normal(5, 700), conf]));
        let long: Vec<Entry> = (1..=2)
            .map(|i| normal(i, INLINE_APPLY_BYTES / 2 + 1))
            .collect();
        assert!(apply_leaves_loop(&long));
        assert!(!apply_leaves_loop(&long[..1]));
    }

    fn request(ns: NamespaceId, n: usize) -> RequestKey {
        (ns, RequestId::try_new(format!("r-{n}")).unwrap().unwrap())
    }

    /// The newest half of the bounds is always kept, never more than the
    /// bounds, and a generation's table keeps the size it got at its first
    /// record (it is never rehashed while the node loop waits).
    #[test]
    fn recent_requests_keep_the_newest_without_rehashing() {
        let namespaces = embedded_namespaces();
        let ns = namespaces.resolve("conv").unwrap();
        let range = |n: usize| vec![SeqRange::try_new(n as u64 + 1, 1).unwrap()];
        let mut recent = RecentRequests::default();
        recent.insert(request(ns, 0), 7, range(0), 1, Instant::now());
        let capacity = recent.young.map.capacity();
        assert!(capacity >= RECENT_REQUESTS / 2);
        let total = RECENT_REQUESTS * 3 / 2 + 10;
        for n in 1..total {
            recent.insert(request(ns, n), 7, range(n), 1, Instant::now());
            assert!(recent.young.map.len() + recent.old.map.len() <= RECENT_REQUESTS);
        }
        assert_eq!(recent.young.map.capacity(), capacity, "rehashed");
        assert_eq!(recent.old.map.capacity(), capacity, "rehashed");
        for n in total - RECENT_REQUESTS / 2..total {
            let (items, ranges, _) = recent.get(&request(ns, n)).expect("a newest record");
            assert_eq!((*items, ranges.clone()), (7, range(n)));
        }
        assert!(
            recent.get(&request(ns, 0)).is_none(),
            "the oldest outlived two generations"
        );

        // Bounded by ranges too: records of many ranges rotate sooner.
        let mut recent = RecentRequests::default();
        let wide = vec![SeqRange::try_new(1, 1).unwrap(); RECENT_RANGES / 8];
        for n in 0..12 {
            recent.insert(request(ns, n), 7, wide.clone(), 1, Instant::now());
            assert!(recent.young.ranges + recent.old.ranges <= RECENT_RANGES);
        }
        assert!(recent.get(&request(ns, 11)).is_some());
        assert!(recent.get(&request(ns, 8)).is_some());
        assert!(recent.get(&request(ns, 0)).is_none());

        recent.clear();
        assert!(recent.get(&request(ns, 11)).is_none());

        // A rotation says how long the records it dropped had been kept at
        // the least: the span of the generation that just became old.
        let mut recent = RecentRequests::default();
        let t0 = Instant::now();
        let wide = vec![SeqRange::try_new(1, 1).unwrap(); RECENT_RANGES / 4];
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            recent.insert(request(ns, 0), 7, wide.clone(), 1, at(0)),
            None
        );
        assert_eq!(
            recent.insert(request(ns, 1), 7, wide.clone(), 1, at(1)),
            None
        );
        // The young generation (since 0 s) is full: it becomes old at 5 s.
        assert_eq!(
            recent.insert(request(ns, 2), 7, wide.clone(), 1, at(5)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            recent.insert(request(ns, 3), 7, wide.clone(), 1, at(6)),
            None
        );
        // The old one (records from 0 and 1 s) is dropped at 8 s; the newest
        // of them was kept 7 s, the one becoming old began at 5 s: 3 s.
        assert_eq!(
            recent.insert(request(ns, 4), 7, wide.clone(), 1, at(8)),
            Some(Duration::from_secs(3))
        );
        assert!(recent.get(&request(ns, 1)).is_none());
    }
}
