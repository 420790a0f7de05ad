//! Deterministic simulation of a seqd cluster.
//!
//! The real node loop (raft-rs, the allocator core, the state machine on
//! RocksDB) runs for 3 or 5 nodes inside one thread, against virtual time, a
//! simulated network and a simulated disk, all driven by one seed:
//!
//! - **Time** advances one millisecond per step. Each node ticks on its own
//!   jittered schedule; raft-rs's election timeout is fixed to one value
//!   (it would draw from a thread RNG), so the seed alone decides who
//!   campaigns first.
//! - **Network**: every message gets a seeded delay (so messages reorder), may
//!   be lost or duplicated, and links can be cut both ways or one way.
//! - **Disk**: RocksDB in memory, with every write journaled; a crash keeps
//!   only the writes up to the last synced one (see [`Journal`]).
//! - **Clocks**: each node's wall clock has its own offset, jumped forward and
//!   back by the nemesis; its monotonic clock is virtual time.
//! - **Clients** call whichever node they believe leads (and sometimes any
//!   node); Snowflake IDs are issued from every node.
//!
//! Every completed call and every issued ID goes through the [`Checker`]
//! as it happens. The same seed replays the same run: the report carries a
//! digest of everything handed out, and a failure prints its seed.

mod checker;

pub use checker::{Answer, Checker};

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::raft::prelude::{Message, MessageType};
use tokio::sync::{mpsc, oneshot};

use crate::config::{RaftConfig, ReadMode, ReadRoundPeers, SnowflakeConfig};
use crate::core::{Clock, Issuer, Layout, Mode, NamespaceSpec, Namespaces, SeqKey, MAX_SEQUENCE};
use crate::raft::{
    Grant, IdState, Input, Node, NodeError, NodeParams, NodeTesting, NodeTime, Outbox,
    SnapshotReport, SnapshotSends, Syncer, VirtualTime,
};
use crate::storage::{self, Journal};

/// The wall clock every simulated node starts from (2026-01-01).
const WALL_ORIGIN_MS: u64 = 1_767_225_600_000;
/// How long a client waits for an answer before giving up on a call.
const CLIENT_PATIENCE_MS: u64 = 1_500;
/// How long the cluster gets, once the nemesis stops, to serve again.
const RECOVERY_MS: u64 = 10_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    /// Virtual time under the nemesis, in milliseconds.
    pub duration_ms: u64,
    pub clients: usize,
    /// Inject crashes, pauses, partitions, message chaos and clock jumps.
    pub faults: bool,
    /// Serve calls without the ReadIndex round (a deliberate bug).
    pub break_leadership_check: bool,
    /// Leaders answer under a lease (read_mode = "lease").
    pub lease: bool,
    /// A lease that outlives the followers' promise (a deliberate bug).
    pub break_lease: bool,
    /// Which followers read rounds ask (raft.read_round_peers).
    pub read_round_peers: ReadRoundPeers,
    /// Print every fault and leader change (for replaying a seed).
    pub trace: bool,
}

impl SimConfig {
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            duration_ms: 15_000,
            clients: 9,
            faults: true,
            break_leadership_check: false,
            lease: false,
            break_lease: false,
            read_round_peers: ReadRoundPeers::default(),
            trace: std::env::var_os("SEQD_SIM_TRACE").is_some(),
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub seed: u64,
    pub nodes: usize,
    pub steps: u64,
    /// Completed calls, one per key of a batch.
    pub calls: u64,
    pub numbers: u64,
    pub failed_calls: u64,
    /// Ranges handed out after their client had given up waiting, or
    /// whose answer was lost on its way (see `lost_answers`).
    pub unobserved: u64,
    /// Answers to calls with a request id lost on their way to the client,
    /// which then tried again with the id.
    pub lost_answers: u64,
    /// Holes in keys' numbers (each must come with a new epoch).
    pub holes: u64,
    /// Of those, holes under one epoch beside a retry answered after its
    /// epoch ended (allowed, see `Checker::mark_late`).
    pub holes_beside_late: u64,
    pub ids: u64,
    pub id_errors: u64,
    pub crashes: u64,
    /// Journaled writes lost by crashes (written but not yet synced).
    pub lost_writes: u64,
    pub pauses: u64,
    pub partitions: u64,
    pub chaos: u64,
    pub clock_jumps: u64,
    /// Leadership handovers asked of the leader (trim, then transfer).
    pub transfers: u64,
    /// Graceful stops asked of the leader (a handover, then the node
    /// stops, keeping what it wrote; started again later), and those
    /// that stopped.
    pub shutdowns: u64,
    pub stopped: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// Idle keys released from a leader's memory through the log.
    pub keys_released: u64,
    /// Snapshots nodes installed (caught up from a leader's snapshot).
    pub snapshots_installed: u64,
    /// Read rounds leaders sent, and the heartbeats that carried one (a
    /// round's own, and raft-rs's periodic ones while one was pending).
    pub read_rounds: u64,
    pub read_heartbeats: u64,
    /// Rounds sent to every follower again after the chosen ones were slow.
    pub read_resends: u64,
    /// Whether a call succeeded after the nemesis stopped.
    pub recovered: bool,
    pub violations: Vec<String>,
    /// Hash of every number and ID handed out, in order: equal digests
    /// mean the same run.
    pub digest: u64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} ({} nodes): {} steps, {} calls ({} numbers, {} failed, {} answers lost, {} unobserved), \
             {} holes ({} just below late retries), {} IDs ({} refused), \
             faults: {} crashes ({} unsynced writes lost), {} pauses, {} partitions, {} chaos, \
             {} clock jumps, {} transfers, {} shutdowns ({} stopped); {} messages ({} dropped, {} duplicated); {} idle keys released; \
             {} snapshots installed; {} read rounds in {} heartbeats ({} resent); recovered: {}; \
             violations: {}; digest {:016x}",
            self.seed,
            self.nodes,
            self.steps,
            self.calls,
            self.numbers,
            self.failed_calls,
            self.lost_answers,
            self.unobserved,
            self.holes,
            self.holes_beside_late,
            self.ids,
            self.id_errors,
            self.crashes,
            self.lost_writes,
            self.pauses,
            self.partitions,
            self.chaos,
            self.clock_jumps,
            self.transfers,
            self.shutdowns,
            self.stopped,
            self.messages,
            self.dropped,
            self.duplicated,
            self.keys_released,
            self.snapshots_installed,
            self.read_rounds,
            self.read_heartbeats,
            self.read_resends,
            self.recovered,
            self.violations.len(),
            self.digest
        )
    }
}

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `per_million` / 1,000,000.
    pub fn chance(&mut self, per_million: u64) -> bool {
        self.next_u64() % 1_000_000 < per_million
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next_u64() % items.len() as u64) as usize]
    }
}

/// A node's wall clock: virtual time plus an offset the nemesis moves.
struct SimClock {
    time: Arc<VirtualTime>,
    offset_ms: std::sync::atomic::AtomicI64,
}

impl SimClock {
    fn offset(&self) -> i64 {
        self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn jump(&self, by_ms: i64) {
        self.offset_ms
            .fetch_add(by_ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        (WALL_ORIGIN_MS + self.time.ms()).saturating_add_signed(self.offset())
    }

    fn mono_ms(&self) -> u64 {
        self.time.ms()
    }
}

/// A node's outgoing messages, collected for the network after each step.
/// A node's sync requests; the simulation syncs its journal when it
/// decides the fsync is done.
struct SimSyncer(Arc<Mutex<Vec<u64>>>);

impl Syncer for SimSyncer {
    fn request(&mut self, number: u64) {
        lock(&self.0).push(number);
    }
}

struct SimOutbox {
    msgs: Arc<Mutex<Vec<Outgoing>>>,
    snapshot_sends: SnapshotSends,
}

/// A message a node sent; a snapshot's with the number of its send.
type Outgoing = (Message, Option<u64>);

impl Outbox for SimOutbox {
    fn send(&mut self, msgs: Vec<Message>) {
        let numbered = msgs.into_iter().map(|msg| {
            let send = self.snapshot_sends.number(&msg);
            (msg, send)
        });
        lock(&self.msgs).extend(numbered);
    }

    fn add_peer(&mut self, _id: u64, _addr: &str) {}

    fn remove_peer(&mut self, _id: u64) {}

    fn newest_snapshot_send(&self, to: u64) -> Option<u64> {
        self.snapshot_sends.newest(to)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One simulated machine: the process (when running) and what outlives it.
struct Slot {
    id: u64,
    node: Option<Node>,
    tx: mpsc::UnboundedSender<Input>,
    outbox: Arc<Mutex<Vec<Outgoing>>>,
    journal: Arc<Mutex<Journal>>,
    /// Sync requests the node made that the simulated disk has not done.
    syncs: Arc<Mutex<Vec<u64>>>,
    /// When the fsync in progress completes (0: none started).
    sync_due: u64,
    /// The newest request the fsync in progress covers (made before it
    /// started).
    sync_covers: u64,
    /// Journal writes made before the fsync in progress started: what it
    /// makes durable.
    sync_journal_len: usize,
    clock: Arc<SimClock>,
    ids: Arc<IdState>,
    next_tick: u64,
    paused_until: u64,
    restart_at: u64,
}

impl Slot {
    fn up(&self, now: u64) -> bool {
        self.node.is_some() && self.paused_until <= now
    }
}

/// Links and messages in flight.
#[derive(Default)]
struct Net {
    /// (delivery time, sequence) → (from, message).
    queue: BTreeMap<(u64, u64), (u64, Message)>,
    seq: u64,
    /// Directed links that lose everything: (from, to).
    cut: Vec<(u64, u64)>,
    heal_at: u64,
    chaos_until: u64,
    /// While set, snapshot messages are kept here as they are sent, with
    /// their sender and the number of their send, neither delivered nor
    /// reported on: a test decides what becomes of them.
    held_snapshots: Option<Vec<(u64, Message, u64)>>,
}

/// A call a client is waiting on.
struct Pending {
    rx: oneshot::Receiver<Result<Grant, NodeError>>,
    call: Call,
    node: u64,
}

/// What a client asks, kept for its retries.
#[derive(Clone)]
struct Call {
    keys: Vec<usize>,
    counts: Vec<u32>,
    /// When the first attempt was sent (for I2: a retry's answer may be
    /// what the first attempt got).
    invoked: u64,
    /// When this attempt was sent (for the client's patience).
    sent: u64,
    /// The request id every attempt carries, if any.
    request_id: Option<String>,
    attempts: u32,
}

/// Attempts a client with request ids makes of a call, as the Rust
/// client retries with the call's id.
const CLIENT_ATTEMPTS: u32 = 3;

struct SimClient {
    target: u64,
    pending: Option<Pending>,
    next_at: u64,
    /// A call to send again, with its request id, after a failed attempt.
    retry: Option<Call>,
    calls: u64,
}

/// Indexes into [`KEYS`].
const SEGMENTED_KEYS: std::ops::Range<usize> = 0..3;
const DENSE_KEYS: std::ops::Range<usize> = 3..5;
const COLD_KEYS: std::ops::Range<usize> = 5..8;

/// Keys per part of a hand-over's trim: one, so that the simulation's
/// handovers trim in more parts than may be in flight (later parts are
/// proposed as earlier ones apply), and its faults cut some of them short.
const SIM_TRIM_PART_KEYS: usize = 1;

/// Keys unused this long are released before a handover's trim: below
/// the namespaces' `forget_idle_ms`, so that handovers release keys the
/// idle sweep has not.
const SIM_HANDOVER_IDLE_MS: u64 = 100;

/// The keys clients use: a few hot segmented ones, two dense ones, and
/// cold segmented ones, used so rarely that they go idle (and are released
/// from the leader's memory) between uses.
const KEYS: &[(&str, &str)] = &[
    ("chat", "g1"),
    ("chat", "g2"),
    ("chat", "g3"),
    ("dense", "d1"),
    ("dense", "d2"),
    ("chat", "c1"),
    ("chat", "c2"),
    ("chat", "c3"),
];

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    time: Arc<VirtualTime>,
    now: u64,
    slots: Vec<Slot>,
    net: Net,
    clients: Vec<SimClient>,
    /// Calls whose clients gave up waiting, until the node answers them.
    abandoned: Vec<Pending>,
    checker: Checker,
    report: SimReport,
    namespaces: Namespaces,
    keys: Vec<SeqKey>,
    raft: RaftConfig,
    snowflake: SnowflakeConfig,
    layout: Layout,
    digest: u64,
    next_fault: u64,
    /// Leader (id, term) last seen, for the trace.
    last_leader: Option<(u64, u64)>,
}

/// Runs one seed and reports what happened. Deterministic: the same seed
/// and configuration give the same report.
pub fn run(seed: u64, cfg: &SimConfig) -> SimReport {
    let mut sim = Sim::new(seed, cfg.clone());
    sim.run();
    sim.finish()
}

fn namespaces() -> Namespaces {
    let spec = |name: &str, mode| NamespaceSpec {
        name: name.to_string(),
        mode,
        // Steps from small (refills, and so leader-side state, change
        // often) to large (a deposed leader holds many unused numbers).
        step_min: 4,
        step_max: 4_096,
        refill_interval_ms: 1_000,
        max_count: 16,
        max_key_bytes: 64,
        max_value: MAX_SEQUENCE,
        // Far below a deployment's minutes, so that keys leave the leader's
        // memory (and come back) all through a run, under every fault.
        forget_idle_ms: 300,
    };
    Namespaces::new(vec![
        spec("chat", Mode::Segmented),
        spec("dense", Mode::Dense),
    ])
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Self {
        let namespaces = namespaces();
        let keys = KEYS
            .iter()
            .map(|(ns, key)| {
                let id = namespaces.lookup(ns).expect("simulated namespace");
                SeqKey::try_new(&namespaces, id, *key).expect("simulated key")
            })
            .collect();
        let raft = RaftConfig {
            tick_ms: 10,
            election_ticks: 10,
            heartbeat_ticks: 2,
            // Compact often so lagging and restarted nodes need snapshots.
            compact_threshold: 200,
            request_timeout_ms: 1_000,
            read_mode: if cfg.lease {
                ReadMode::Lease
            } else {
                ReadMode::ReadIndex
            },
            read_round_peers: cfg.read_round_peers,
            ..RaftConfig::default()
        };
        // Forward jumps of up to 3 s, so both held ones set back and ones
        // believed after holding.
        let snowflake = SnowflakeConfig {
            trust_forward_step_ms: 2_000,
            ..SnowflakeConfig::default()
        };
        let layout = Layout::try_new(
            snowflake.epoch_ms,
            snowflake.time_bits,
            snowflake.worker_bits,
            snowflake.sequence_bits,
        )
        .expect("default layout");
        let time = Arc::new(VirtualTime::new());
        let mut sim = Sim {
            rng: Rng::new(seed),
            report: SimReport {
                seed,
                nodes: cfg.nodes,
                ..SimReport::default()
            },
            clients: (0..cfg.clients)
                .map(|i| SimClient {
                    target: 1 + (i % cfg.nodes) as u64,
                    pending: None,
                    next_at: 0,
                    retry: None,
                    calls: 0,
                })
                .collect(),
            abandoned: Vec::new(),
            cfg,
            time,
            now: 0,
            slots: Vec::new(),
            net: Net::default(),
            checker: Checker::default(),
            namespaces,
            keys,
            raft,
            snowflake,
            layout,
            digest: 0xcbf2_9ce4_8422_2325,
            next_fault: 1_000,
            last_leader: None,
        };
        for id in 1..=sim.cfg.nodes as u64 {
            let clock = Arc::new(SimClock {
                time: sim.time.clone(),
                offset_ms: std::sync::atomic::AtomicI64::new(0),
            });
            let (tx, _) = mpsc::unbounded_channel();
            let slot = Slot {
                id,
                node: None,
                tx,
                outbox: Arc::default(),
                journal: Arc::default(),
                syncs: Arc::default(),
                sync_due: 0,
                sync_covers: 0,
                sync_journal_len: 0,
                ids: sim.id_state(&clock),
                clock,
                next_tick: 0,
                paused_until: 0,
                restart_at: 0,
            };
            sim.slots.push(slot);
            sim.boot(id as usize - 1);
        }
        sim
    }

    fn id_state(&self, clock: &Arc<SimClock>) -> Arc<IdState> {
        Arc::new(IdState::new(
            Issuer::new(
                self.layout,
                self.snowflake.max_rollback_ms,
                self.snowflake.fence_ahead_ms,
            )
            .with_trust_forward_ms(self.snowflake.trust_forward_step_ms)
            .with_max_ahead_of_cluster_ms(self.snowflake.max_ahead_of_cluster_ms),
            clock.clone(),
        ))
    }

    /// Starts the node process of slot `i` from what its disk kept.
    fn boot(&mut self, i: usize) {
        let ids = self.id_state(&self.slots[i].clock);
        // Never 0, as in seqd: worker records use 0 for "no boot".
        let boot = self.rng.next_u64() | 1;
        let slot = &mut self.slots[i];
        slot.ids = ids.clone();
        let disk = storage::open_journaled(slot.journal.clone())
            .unwrap_or_else(|e| panic!("node {}: simulated disk: {e}", slot.id));
        let (tx, rx) = mpsc::unbounded_channel();
        let voters: Vec<u64> = (1..=self.cfg.nodes as u64).collect();
        let params = NodeParams {
            id: slot.id,
            voters: voters.clone(),
            peers: voters.iter().map(|v| (*v, format!("sim-{v}"))).collect(),
            addrs: crate::raft::PeerAddrs::default(),
            data_dir: PathBuf::new(),
            raft: self.raft.clone(),
            namespaces: self.namespaces.clone(),
            join: false,
            snowflake: self.snowflake.clone(),
            ids,
            faults: Arc::default(),
            boot,
            secret: crate::service::Secret::default(),
            testing: NodeTesting {
                fixed_election_timeout: true,
                skip_leadership_check: self.cfg.break_leadership_check,
                stretch_lease: self.cfg.break_lease,
                trim_part_keys: SIM_TRIM_PART_KEYS,
                handover_idle_ms: SIM_HANDOVER_IDLE_MS,
                ..NodeTesting::default()
            },
        };
        let outbox = slot.outbox.clone();
        lock(&slot.syncs).clear();
        slot.sync_due = 0;
        let node = Node::open(
            params,
            disk,
            // No peer service, so no data directory ids.
            0,
            NodeTime::Virtual(self.time.clone()),
            rx,
            |_| {
                Box::new(SimOutbox {
                    msgs: outbox,
                    snapshot_sends: SnapshotSends::default(),
                })
            },
            Box::new(SimSyncer(slot.syncs.clone())),
        )
        .unwrap_or_else(|e| panic!("node {}: restart failed: {e}", slot.id));
        slot.node = Some(node);
        slot.tx = tx;
        slot.next_tick = self.now + self.rng.range(1, self.raft.tick_ms);
    }

    /// Kills slot `i`'s process: unsynced writes are lost, calls in it fail.
    fn crash(&mut self, i: usize, down_ms: u64) {
        self.take_down(i, down_ms, false);
    }

    /// Slot `i`'s node stopped of its own accord (a graceful shutdown):
    /// what it wrote stays (the process exits, the machine does not), and
    /// it starts again after `down_ms`.
    fn stopped(&mut self, i: usize, down_ms: u64) {
        self.report.stopped += 1;
        self.take_down(i, down_ms, true);
    }

    fn take_down(&mut self, i: usize, down_ms: u64, graceful: bool) {
        let keep_some = self.rng.chance(250_000);
        let pick = self.rng.next_u64();
        let slot = &mut self.slots[i];
        let Some(node) = slot.node.take() else {
            return;
        };
        self.report.keys_released += node.keys_released;
        self.report.snapshots_installed += node.snapshots_installed;
        self.report.read_rounds += node.read_rounds_sent;
        self.report.read_resends += node.read_resends;
        lock(&slot.outbox).clear();
        lock(&slot.syncs).clear();
        slot.sync_due = 0;
        let lost = {
            let mut journal = lock(&slot.journal);
            // Some of what was written but not synced may survive (a
            // prefix); most often none of it does.
            let keep = if graceful {
                journal.unsynced()
            } else if keep_some {
                (pick % (journal.unsynced() as u64 + 1)) as usize
            } else {
                0
            };
            journal.lose_unsynced_but(keep)
        };
        self.report.lost_writes += lost as u64;
        if !graceful {
            self.report.crashes += 1;
        }
        slot.paused_until = 0;
        slot.restart_at = self.now + down_ms;
        self.trace(format_args!(
            "{} node {} for {down_ms} ms, {lost} unsynced writes lost",
            if graceful { "stopped" } else { "crash" },
            i + 1
        ));
    }

    fn run(&mut self) {
        let end = self.cfg.duration_ms;
        while self.now < end {
            self.step(true);
        }
        // Heal everything and see the cluster serve again.
        self.net.cut.clear();
        self.net.chaos_until = 0;
        for i in 0..self.slots.len() {
            self.slots[i].paused_until = 0;
            if self.slots[i].node.is_none() {
                self.slots[i].restart_at = self.now;
            }
        }
        let calls_before = self.checker.calls();
        while self.now < end + RECOVERY_MS && !self.report.recovered {
            self.step(false);
            self.report.recovered = self.checker.calls() > calls_before;
        }
    }

    fn step(&mut self, nemesis: bool) {
        self.now += 1;
        self.time.set_ms(self.now);
        if nemesis && self.cfg.faults && self.now >= self.next_fault {
            self.inject_fault();
            self.next_fault = self.now + self.rng.range(100, 900);
        }
        if self.net.heal_at != 0 && self.now >= self.net.heal_at {
            self.net.cut.clear();
            self.net.heal_at = 0;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].node.is_none() && self.now >= self.slots[i].restart_at {
                self.boot(i);
            }
        }
        self.deliver();
        self.start_calls();
        self.issue_ids();
        for i in 0..self.slots.len() {
            self.run_node(i);
        }
        self.collect_replies();
        if self.cfg.trace {
            let leader = self.leader().map(|i| {
                let st = self.slots[i].node.as_ref().map(|n| n.status());
                (i as u64 + 1, st.map_or(0, |s| s.term))
            });
            if leader != self.last_leader {
                self.trace(format_args!("leader now {leader:?}"));
                self.last_leader = leader;
            }
        }
        self.report.steps += 1;
    }

    fn trace(&self, what: std::fmt::Arguments<'_>) {
        if self.cfg.trace {
            println!("[seed {} t={}ms] {what}", self.report.seed, self.now);
        }
    }

    fn run_node(&mut self, i: usize) {
        let now = self.now;
        let jitter = self.rng.range(0, 4);
        // An fsync takes 1-3 ms, and one in fifty stalls for 20-200 ms (as
        // this project's VM disk does).
        let fsync_ms = if self.rng.chance(20_000) {
            self.rng.range(20, 200)
        } else {
            self.rng.range(0, 3)
        };
        let slot = &mut self.slots[i];
        if !slot.up(now) {
            return;
        }
        let Some(node) = slot.node.as_mut() else {
            return;
        };
        // One fsync at a time, as the sync thread does: it covers the
        // requests made before it started and answers for those only;
        // requests made meanwhile wait for the next one.
        if slot.sync_due != 0 && now >= slot.sync_due {
            let covers = slot.sync_covers;
            lock(&slot.syncs).retain(|&n| n > covers);
            slot.sync_due = 0;
            lock(&slot.journal).sync_prefix(slot.sync_journal_len);
            let _ = slot.tx.send(Input::Persisted(covers));
        }
        if slot.sync_due == 0 {
            if let Some(newest) = lock(&slot.syncs).iter().copied().max() {
                slot.sync_due = now + fsync_ms.max(1);
                slot.sync_covers = newest;
                slot.sync_journal_len = lock(&slot.journal).len();
            }
        }
        // A stop signal: the node has handed over after a Shutdown (or
        // was not leading) and stops, as the server does.
        let mut stop = node.drain_inbox();
        if now >= slot.next_tick {
            stop = stop.or(node.on_tick(self.time.instant()));
            // Ticks drift: 8..12 ms apart around a 10 ms tick.
            slot.next_tick = now + self.raft.tick_ms - 2 + jitter;
        }
        match node.pass() {
            Ok(done) => stop = stop.or(done),
            Err(e) => {
                if lock(&slot.journal).power_failed() {
                    // The armed power loss hit in the middle of the round.
                    let down = self.rng.range(50, 1_000);
                    self.crash(i, down);
                    return;
                }
                panic!("node {}: storage failed in the simulation: {e}", slot.id);
            }
        }
        let msgs = std::mem::take(&mut *lock(&slot.outbox));
        let from = slot.id;
        for (msg, snapshot_send) in msgs {
            self.send(from, msg, snapshot_send);
        }
        if let Some(done) = stop {
            let _ = done.send(());
            let down = self.rng.range(50, 1_000);
            self.stopped(i, down);
        }
    }

    fn send(&mut self, from: u64, msg: Message, snapshot_send: Option<u64>) {
        self.report.messages += 1;
        if msg.get_msg_type() == MessageType::MsgHeartbeat && !msg.get_context().is_empty() {
            self.report.read_heartbeats += 1;
        }
        let to = msg.to;
        if let (Some(held), Some(send)) = (self.net.held_snapshots.as_mut(), snapshot_send) {
            held.push((from, msg, send));
            return;
        }
        let chaos = self.now < self.net.chaos_until;
        let lost = self.net.cut.contains(&(from, to))
            || self.rng.chance(if chaos { 150_000 } else { 2_000 });
        if let Some(send) = snapshot_send {
            // The transport reports whether a snapshot went out.
            let _ = self.slots[from as usize - 1]
                .tx
                .send(Input::SnapshotSent(SnapshotReport::of(&msg, send, !lost)));
        }
        if lost {
            self.report.dropped += 1;
            return;
        }
        let copies = if chaos && self.rng.chance(100_000) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if chaos {
                self.rng.range(1, 80)
            } else {
                self.rng.range(1, 3)
            };
            self.net.seq += 1;
            self.net
                .queue
                .insert((self.now + delay, self.net.seq), (from, msg.clone()));
        }
    }

    fn deliver(&mut self) {
        let mut held = Vec::new();
        while let Some(entry) = self.net.queue.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (_, (from, msg)) = entry.remove_entry();
            let slot = &self.slots[msg.to as usize - 1];
            if slot.node.is_none() {
                continue;
            }
            if slot.paused_until > self.now {
                // A stopped process's socket buffers hold what arrives.
                held.push((from, msg));
                continue;
            }
            let _ = slot.tx.send(Input::Raft(Box::new(msg)));
        }
        for (from, msg) in held {
            let at = self.slots[msg.to as usize - 1].paused_until;
            self.net.seq += 1;
            self.net.queue.insert((at, self.net.seq), (from, msg));
        }
    }

    fn start_calls(&mut self) {
        let n = self.slots.len() as u64;
        for c in 0..self.clients.len() {
            if self.clients[c].pending.is_some() || self.now < self.clients[c].next_at {
                continue;
            }
            // Mostly the node believed to lead; sometimes any node, as a
            // frontend with stale routing would.
            let target = if self.rng.chance(100_000) {
                self.rng.range(1, n)
            } else {
                self.clients[c].target
            };
            let mut call = match self.clients[c].retry.take() {
                Some(mut call) => {
                    call.attempts += 1;
                    call
                }
                None => self.new_call(c),
            };
            call.sent = self.now;
            let slot = &self.slots[target as usize - 1];
            if slot.node.is_none() {
                // Connection refused: try another node next time.
                self.report.failed_calls += 1;
                self.clients[c].target = self.rng.range(1, n);
                self.clients[c].next_at = self.now + 5;
                self.retry_later(c, call);
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let deadline =
                self.time.instant() + Duration::from_millis(self.raft.request_timeout_ms);
            let items = call
                .keys
                .iter()
                .zip(&call.counts)
                .map(|(&k, &count)| (self.keys[k].clone(), count))
                .collect();
            let request_id = call.request_id.as_ref().map(|id| {
                crate::core::RequestId::try_new(id.clone())
                    .expect("a valid request id")
                    .expect("not empty")
            });
            let _ = slot.tx.send(Input::Allocate {
                items,
                request_id,
                reply,
                deadline,
            });
            self.clients[c].target = target;
            self.clients[c].pending = Some(Pending {
                rx,
                call,
                node: target,
            });
        }
    }

    /// Client `c`'s next call. Every third client uses the dense keys, the
    /// others the segmented ones; a batch names two keys of one namespace.
    /// Odd clients give each call a request id, and try a failed call again
    /// with it.
    fn new_call(&mut self, c: usize) -> Call {
        let group = if c % 3 == 2 {
            DENSE_KEYS
        } else if self.rng.chance(20_000) {
            COLD_KEYS
        } else {
            SEGMENTED_KEYS
        };
        let pick = |rng: &mut Rng| group.start + rng.range(0, group.len() as u64 - 1) as usize;
        let first = pick(&mut self.rng);
        let mut keys = vec![first];
        if self.rng.chance(150_000) {
            let second = pick(&mut self.rng);
            if second != first {
                keys.push(second);
            }
        }
        let counts = keys.iter().map(|_| self.rng.range(1, 3) as u32).collect();
        self.clients[c].calls += 1;
        Call {
            keys,
            counts,
            invoked: self.now,
            sent: self.now,
            request_id: (c % 2 == 1).then(|| format!("client-{c}-{}", self.clients[c].calls)),
            attempts: 1,
        }
    }

    /// After a failed attempt: a call with a request id is sent again
    /// (until it has had [`CLIENT_ATTEMPTS`]); others are dropped.
    fn retry_later(&mut self, c: usize, call: Call) {
        if call.request_id.is_some() && call.attempts < CLIENT_ATTEMPTS {
            self.clients[c].retry = Some(call);
        }
    }

    fn collect_replies(&mut self) {
        let n = self.slots.len() as u64;
        for c in 0..self.clients.len() {
            let Some(p) = self.clients[c].pending.as_mut() else {
                continue;
            };
            let outcome = match p.rx.try_recv() {
                Ok(r) => Some(r),
                Err(oneshot::error::TryRecvError::Closed) => Some(Err(NodeError::Stopped)),
                Err(oneshot::error::TryRecvError::Empty) => {
                    (self.now - p.call.sent > CLIENT_PATIENCE_MS).then_some(Err(
                        NodeError::Timeout(Duration::from_millis(CLIENT_PATIENCE_MS)),
                    ))
                }
            };
            let Some(outcome) = outcome else {
                continue;
            };
            let Some(p) = self.clients[c].pending.take() else {
                continue;
            };
            self.clients[c].next_at = self.now + self.rng.range(0, 4);
            match outcome {
                // The answer is lost on its way (one in twenty, for calls
                // with a request id): handed out, seen by no one, and the
                // client tries again with the id, which must get the same.
                Ok(grant)
                    if p.call.request_id.is_some()
                        && p.call.attempts < CLIENT_ATTEMPTS
                        && self.rng.chance(50_000) =>
                {
                    self.record_grant(&p, &grant, None);
                    self.report.lost_answers += 1;
                    self.retry_later(c, p.call);
                }
                Ok(grant) => self.record_grant(&p, &grant, Some(c)),
                Err(e) => {
                    self.report.failed_calls += 1;
                    if self.cfg.trace {
                        let keys: Vec<&str> = p.call.keys.iter().map(|k| KEYS[*k].1).collect();
                        self.trace(format_args!(
                            "client {c} node {} {keys:?} {:?} failed: {e} (invoked {})",
                            p.node, p.call.request_id, p.call.invoked
                        ));
                    }
                    if let (NodeError::RequestIdReused, Some(id)) = (&e, &p.call.request_id) {
                        self.checker.report(format!(
                            "idempotency: node {} refused request {id}, sent again unchanged, as reused",
                            p.node
                        ));
                    }
                    self.clients[c].target = match e {
                        NodeError::NotLeader { leader: Some(l) } => l,
                        _ => self.rng.range(1, n),
                    };
                    self.retry_later(c, p.call.clone());
                    if matches!(e, NodeError::Timeout(_)) {
                        // The node may still answer: what it hands out
                        // then is spent all the same.
                        self.abandoned.push(p);
                    }
                }
            }
        }
        self.collect_abandoned();
    }

    /// Answers to calls whose clients gave up: their numbers are handed
    /// out (the node sent them), though no caller saw them.
    fn collect_abandoned(&mut self) {
        let mut i = 0;
        while i < self.abandoned.len() {
            let answer = match self.abandoned[i].rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    i += 1;
                    continue;
                }
                Ok(Ok(grant)) => Some(grant),
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => None,
            };
            let p = self.abandoned.swap_remove(i);
            if let Some(grant) = answer {
                self.record_grant(&p, &grant, None);
            }
        }
    }

    /// Checks and records what a node answered to `p`: for `client`, who
    /// sees it now, or for no one (the client had given up). A retry
    /// answered with its request id's earlier ranges hands out nothing new.
    fn record_grant(&mut self, p: &Pending, grant: &Grant, client: Option<usize>) {
        let ranges: Vec<(u64, u64)> = grant.ranges.iter().map(|r| (r.first(), r.last())).collect();
        // One range per item, of the count asked for: a short or missing
        // range would pass every other check.
        let sizes: Vec<u64> = ranges.iter().map(|(f, l)| l - f + 1).collect();
        let asked: Vec<u64> = p.call.counts.iter().map(|&c| u64::from(c)).collect();
        if sizes != asked {
            self.checker.report(format!(
                "a call asking for {asked:?} (keys {:?}) was answered with ranges {ranges:?}",
                p.call.keys
            ));
        }
        // A retry answered from its request id's record (it says so) by a
        // node already in a later epoch (see `Checker::mark_late`). A first
        // attempt has no record to be answered from.
        let late = grant.replayed
            && self.slots[p.node as usize - 1]
                .node
                .as_ref()
                .is_some_and(|n| n.status().epoch > grant.epoch);
        let answer = match &p.call.request_id {
            Some(id) => {
                if grant.replayed && p.call.attempts == 1 {
                    self.checker.replayed_first_attempt(id, self.now);
                }
                let dense = DENSE_KEYS.contains(&p.call.keys[0]);
                self.checker.record_request(
                    id,
                    dense,
                    &ranges,
                    (grant.epoch, grant.replayed),
                    self.now,
                )
            }
            None => Answer::First,
        };
        for (k, &(first, last)) in p.call.keys.iter().zip(&ranges) {
            let (ns, key) = KEYS[*k];
            let name = format!("{ns}/{key}");
            let span = (p.call.invoked, self.now);
            match (client, answer) {
                (Some(_), Answer::Repeat) => {
                    self.checker.record_completion(&name, span, (first, last))
                }
                (Some(_), _) => self
                    .checker
                    .record_call(&name, span, (first, last), grant.epoch),
                (None, Answer::Repeat) => {}
                (None, _) => {
                    self.checker
                        .record_unobserved(&name, self.now, (first, last), grant.epoch)
                }
            }
            if late && answer != Answer::Repeat {
                self.checker.mark_late(&name, first);
            }
            self.mix(&[*k as u64, first, last]);
            if self.cfg.trace {
                let who = client.map_or(
                    "no client (it gave up, or the answer was lost):".to_string(),
                    |c| format!("client {c}"),
                );
                self.trace(format_args!(
                    "{who} node {} {name} [{first}, {last}] epoch {} {:?} {answer:?} (invoked {})",
                    p.node, grant.epoch, p.call.request_id, p.call.invoked
                ));
            }
        }
    }

    /// Now and then every node that is up issues IDs in the same
    /// millisecond (two nodes stamping one worker id would collide there,
    /// where one node at a time stamps different milliseconds), and the
    /// worker ids of the nodes issuing are compared: the simulation never
    /// changes membership, so no two may hold one.
    fn issue_ids(&mut self) {
        if !self.rng.chance(100_000) {
            return;
        }
        let mut workers: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.slots.len() {
            if !self.slots[i].up(self.now) {
                continue;
            }
            let count = self.rng.range(1, 64);
            let mut ids = Vec::new();
            match self.slots[i].ids.issue(count, &mut ids) {
                Ok((_, worker)) => {
                    let id = self.slots[i].id;
                    self.checker.record_ids(id, &ids);
                    self.mix(&ids);
                    if let Some((other, _)) = workers.iter().find(|(_, w)| *w == worker) {
                        self.checker.report(format!(
                            "I5: nodes {other} and {id} both issue as worker {worker}"
                        ));
                    }
                    workers.push((id, worker));
                }
                // No worker yet, fence reached, clock too far back: refused,
                // which is allowed; handing out a duplicate is not.
                Err(_) => self.report.id_errors += 1,
            }
        }
    }

    fn inject_fault(&mut self) {
        let n = self.slots.len();
        let majority_margin = (n - 1) / 2;
        let impaired = self
            .slots
            .iter()
            .filter(|s| s.node.is_none() || s.paused_until > self.now)
            .count();
        let i = self.rng.range(0, n as u64 - 1) as usize;
        match self.rng.range(0, 6) {
            0 if impaired < majority_margin => {
                if self.rng.chance(500_000) {
                    let down = self.rng.range(50, 2_000);
                    self.crash(i, down);
                } else if self.slots[i].node.is_some() {
                    // Power fails a few writes from now, mid-round.
                    let writes = self.rng.range(0, 6);
                    lock(&self.slots[i].journal).fail_after(writes);
                    self.trace(format_args!(
                        "node {} loses power in {writes} writes",
                        i + 1
                    ));
                }
            }
            1 if impaired < majority_margin && self.slots[i].node.is_some() => {
                self.slots[i].paused_until = self.now + self.rng.range(100, 1_500);
                self.report.pauses += 1;
                let until = self.slots[i].paused_until;
                self.trace(format_args!("pause node {} until {until} ms", i + 1));
            }
            2 => {
                self.partition();
                self.report.partitions += 1;
            }
            3 => {
                self.net.chaos_until = self.now + self.rng.range(300, 2_000);
                self.report.chaos += 1;
                let until = self.net.chaos_until;
                self.trace(format_args!("message chaos until {until} ms"));
            }
            4 => {
                // Backward more often than forward: the dangerous direction.
                let by = self.rng.range(10, 3_000) as i64;
                let by = if self.rng.chance(650_000) { -by } else { by };
                self.slots[i].clock.jump(by);
                self.report.clock_jumps += 1;
                self.trace(format_args!("node {} clock jumps {by} ms", i + 1));
            }
            5 => {
                // Whoever leads hands over, as an operator's transfer or a
                // rolling restart asks: to a node named half the time (which
                // may be down or cut off), else to the most caught-up one.
                if let Some(l) = self.leader() {
                    let others: Vec<u64> =
                        (1..=n as u64).filter(|&id| id != l as u64 + 1).collect();
                    if impaired < majority_margin && self.rng.chance(330_000) {
                        // A rolling restart's stop: hand over, then stop.
                        let (done, _) = oneshot::channel();
                        let _ = self.slots[l].tx.send(Input::Shutdown(done));
                        self.report.shutdowns += 1;
                        self.trace(format_args!("node {} shuts down", l + 1));
                    } else {
                        let to = self.rng.chance(500_000).then(|| self.rng.pick(&others));
                        let (reply, _) = oneshot::channel();
                        let _ = self.slots[l].tx.send(Input::TransferLeader { to, reply });
                        self.report.transfers += 1;
                        self.trace(format_args!("node {} hands over to {to:?}", l + 1));
                    }
                }
            }
            _ => {
                // Whoever leads now crashes: the failover case.
                if impaired < majority_margin {
                    if let Some(l) = self.leader() {
                        let down = self.rng.range(50, 1_000);
                        self.crash(l, down);
                    }
                }
            }
        }
    }

    fn partition(&mut self) {
        let n = self.slots.len() as u64;
        let ids: Vec<u64> = (1..=n).collect();
        let mut cut = Vec::new();
        match self.rng.range(0, 2) {
            0 => {
                // Isolate one node (often the leader).
                let victim = match self.leader() {
                    Some(l) if self.rng.chance(600_000) => l as u64 + 1,
                    _ => self.rng.pick(&ids),
                };
                for &o in &ids {
                    if o != victim {
                        cut.push((victim, o));
                        cut.push((o, victim));
                    }
                }
            }
            1 => {
                // Split into two random sides.
                let side: Vec<bool> = ids.iter().map(|_| self.rng.chance(500_000)).collect();
                for &a in &ids {
                    for &b in &ids {
                        if side[a as usize - 1] != side[b as usize - 1] {
                            cut.push((a, b));
                        }
                    }
                }
            }
            _ => {
                // One-way loss on a few links.
                for _ in 0..self.rng.range(1, n) {
                    let a = self.rng.pick(&ids);
                    let b = self.rng.pick(&ids);
                    if a != b {
                        cut.push((a, b));
                    }
                }
            }
        }
        self.net.heal_at = self.now + self.rng.range(200, 3_000);
        self.trace(format_args!(
            "cut links {cut:?} until {} ms",
            self.net.heal_at
        ));
        self.net.cut = cut;
    }

    /// The slot whose node believes it leads in the highest term.
    fn leader(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.node.as_ref().map(|n| (i, n.status())))
            .filter(|(_, st)| st.role == "Leader")
            .max_by_key(|(_, st)| st.term)
            .map(|(i, _)| i)
    }

    /// FNV-1a over what was handed out.
    fn mix(&mut self, values: &[u64]) {
        for v in values {
            for b in v.to_le_bytes() {
                self.digest ^= u64::from(b);
                self.digest = self.digest.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }

    fn finish(mut self) -> SimReport {
        for slot in &self.slots {
            if let Some(node) = &slot.node {
                self.report.keys_released += node.keys_released;
                self.report.snapshots_installed += node.snapshots_installed;
                self.report.read_rounds += node.read_rounds_sent;
                self.report.read_resends += node.read_resends;
            }
        }
        self.checker.check_epochs();
        self.report.calls = self.checker.calls();
        self.report.unobserved = self.checker.unobserved();
        self.report.holes = self.checker.holes();
        self.report.holes_beside_late = self.checker.holes_beside_late();
        self.report.numbers = self.checker.numbers();
        self.report.ids = self.checker.ids();
        self.report.violations = self.checker.violations().to_vec();
        self.report.digest = self.digest;
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asks slot `i`'s node for one number of `KEYS[key]` and runs the node
    /// once: the answer, if it came in that run.
    fn call_in_one_run(sim: &mut Sim, i: usize, key: usize) -> Option<Result<Grant, NodeError>> {
        let mut rx = send_call(sim, i, key, 1, None);
        sim.run_node(i);
        rx.try_recv().ok()
    }

    /// Asks slot `i`'s node for `count` numbers of `KEYS[key]` under
    /// `request_id`; the receiver of its answer.
    fn send_call(
        sim: &mut Sim,
        i: usize,
        key: usize,
        count: u32,
        request_id: Option<&str>,
    ) -> oneshot::Receiver<Result<Grant, NodeError>> {
        let (reply, rx) = oneshot::channel();
        let deadline = sim.time.instant() + Duration::from_millis(sim.raft.request_timeout_ms);
        let request_id = request_id.map(|r| {
            crate::core::RequestId::try_new(r.to_string())
                .expect("a valid request id")
                .expect("not empty")
        });
        sim.slots[i]
            .tx
            .send(Input::Allocate {
                items: vec![(sim.keys[key].clone(), count)],
                request_id,
                reply,
                deadline,
            })
            .expect("the node is running");
        rx
    }

    /// Steps the simulation until `rx` is answered.
    fn answer(
        sim: &mut Sim,
        mut rx: oneshot::Receiver<Result<Grant, NodeError>>,
    ) -> Result<Grant, NodeError> {
        for _ in 0..3_000 {
            if let Ok(r) = rx.try_recv() {
                return r;
            }
            sim.step(false);
        }
        panic!("no answer within 3 s");
    }

    /// Sends slot `i`'s node a vote request of the next term from node
    /// `from`, with a log ahead of its own, and runs the node once: whether
    /// the node stepped it (stepped, a vote of a higher term moves the node
    /// to that term, and this one it would grant).
    fn vote_stepped(sim: &mut Sim, i: usize, from: u64) -> bool {
        let before = sim.slots[i].node.as_ref().expect("running").status();
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVote);
        vote.from = from;
        vote.to = i as u64 + 1;
        vote.term = before.term + 1;
        vote.log_term = before.term + 1;
        vote.index = before.last_index + 1_000;
        sim.slots[i]
            .tx
            .send(Input::Raft(Box::new(vote)))
            .expect("the node is running");
        sim.run_node(i);
        let after = sim.slots[i].node.as_ref().expect("running").status();
        after.term > before.term
    }

    /// A three-node simulation, 2 s in without faults, with one follower
    /// the leader's messages no longer reach: the simulation, that
    /// follower's slot, and the other follower's id. Without heartbeats the
    /// follower would not refuse a vote by raft-rs's own rule either; the
    /// other follower keeps hearing the leader, so it never campaigns.
    fn with_a_follower_cut_off(seed: u64) -> (Sim, usize, u64) {
        let cfg = SimConfig {
            faults: false,
            clients: 0,
            ..SimConfig::new(3)
        };
        let mut sim = Sim::new(seed, cfg);
        step_until(&mut sim, 0, 2_000);
        let l = sim.leader().expect("a leader after 2 s without faults");
        let f = (l + 1) % 3;
        sim.net.cut.push((l as u64 + 1, f as u64 + 1));
        (sim, f, (l + 2) as u64 % 3 + 1)
    }

    /// Crashes slot `i`'s node and starts it again at once, with the
    /// simulation's Raft settings as they are now: when it started.
    fn restart(sim: &mut Sim, i: usize) -> u64 {
        sim.crash(i, 0);
        sim.step(false);
        sim.now
    }

    /// Steps the simulation until `ms` after `since`.
    fn step_until(sim: &mut Sim, since: u64, ms: u64) {
        while sim.now < since + ms {
            sim.step(false);
        }
    }

    /// A follower restarted with a shorter election timeout (a rolling
    /// change) refuses votes for the longer promise it named before: a
    /// leader may hold a lease on that promise, granted on this follower's
    /// last acknowledgements before the restart. It records its new promise
    /// only once that has run out: a restart before then still refuses for
    /// the old one, a restart after it for the new one only.
    #[test]
    fn a_restart_with_a_shorter_timeout_keeps_the_promise_named_before() {
        let (mut sim, f, g) = with_a_follower_cut_off(5);
        // Named before: (10 - 2) ticks of 10 ms. Now: (4 - 2) ticks, and an
        // election timeout of 40 ms.
        sim.raft.election_ticks = 4;
        let restarted = restart(&mut sim, f);
        step_until(&mut sim, restarted, 60);
        assert!(
            !vote_stepped(&mut sim, f, g),
            "a vote 60 ms after the restart was stepped, within the 80 ms promise named before"
        );
        // Restarted again before that promise ran out: it is still kept.
        let restarted = restart(&mut sim, f);
        step_until(&mut sim, restarted, 60);
        assert!(
            !vote_stepped(&mut sim, f, g),
            "after a quick second restart a vote at 60 ms was stepped: the new promise was \
             recorded before the old one ran out"
        );
        step_until(&mut sim, restarted, 100);
        assert!(
            vote_stepped(&mut sim, f, g),
            "a vote 100 ms after the restart, past every promise, was refused"
        );
        let again = restart(&mut sim, f);
        step_until(&mut sim, again, 60);
        assert!(
            vote_stepped(&mut sim, f, g),
            "after a second restart the 20 ms promise named since was not the one kept"
        );
    }

    /// A longer promise is recorded as the node starts, before its peers
    /// hear it and grant leases on it: restarted again at once, with a
    /// shorter timeout, the node still refuses votes for that longer one.
    #[test]
    fn a_longer_promise_is_recorded_before_it_is_named() {
        let (mut sim, f, g) = with_a_follower_cut_off(6);
        // (16 - 2) ticks of 10 ms: 140 ms, named for 50 ms only.
        sim.raft.election_ticks = 16;
        let longer = restart(&mut sim, f);
        step_until(&mut sim, longer, 50);
        sim.raft.election_ticks = 4;
        let restarted = restart(&mut sim, f);
        step_until(&mut sim, restarted, 100);
        assert!(
            !vote_stepped(&mut sim, f, g),
            "a vote 100 ms after the restart was stepped, within the 140 ms promise named before"
        );
        step_until(&mut sim, restarted, 150);
        assert!(
            vote_stepped(&mut sim, f, g),
            "a vote 150 ms after the restart, past every promise, was refused"
        );
    }

    /// raft-rs drops a leader's proposal (here: a transfer is pending)
    /// while a dense raise proposed before it is still in flight. That raise
    /// commits later, recording its range under its request id; the leader
    /// must not hand the same numbers to a new call meanwhile (a retry of
    /// the first call gets its recorded range), and the epoch must change
    /// (the segments forgotten with the memory leave holes).
    #[test]
    fn a_dropped_proposal_does_not_reuse_a_raise_still_in_flight() {
        let (mut sim, l) = quiet_cluster(11);
        let dense = DENSE_KEYS.start;
        let warm = send_call(&mut sim, l, dense, 1, None);
        let warm = answer(&mut sim, warm).expect("a dense call before the drop");
        let epoch = warm.epoch;

        // A's raise goes out; the network is not stepped, so it stays
        // uncommitted while raft-rs drops B's.
        let a = send_call(&mut sim, l, dense, 2, Some("call-a"));
        sim.run_node(l);
        let follower = (l as u64 + 1) % 3 + 1;
        sim.slots[l]
            .node
            .as_mut()
            .expect("running")
            .raft_transfer_for_test(Some(follower));
        let b = send_call(&mut sim, l, dense, 1, None);
        sim.run_node(l);
        sim.slots[l]
            .node
            .as_mut()
            .expect("running")
            .raft_transfer_for_test(None);
        // A new call at once, before A's raise has committed.
        let c = send_call(&mut sim, l, dense, 1, None);
        sim.run_node(l);
        let a = answer(&mut sim, a);
        let b = answer(&mut sim, b);
        assert!(b.is_err(), "the dropped call was answered: {b:?}");
        let c = answer(&mut sim, c);
        // A retry of A gets what A's committed raise recorded.
        let a_again = send_call(&mut sim, l, dense, 2, Some("call-a"));
        let a_again = answer(&mut sim, a_again).expect("a retry of A");
        let recorded = a_again.ranges[0];
        if let Ok(a) = &a {
            assert_eq!(a.ranges[0], recorded, "A and its retry differ");
        }
        if let Ok(c) = &c {
            let c = c.ranges[0];
            assert!(
                c.last() < recorded.first() || c.first() > recorded.last(),
                "C got {c:?}, which overlaps A's recorded {recorded:?}"
            );
        }
        // Served again (a new call succeeds), under a new epoch.
        let d = send_call(&mut sim, l, dense, 1, None);
        let d = answer(&mut sim, d).expect("served again after the drop");
        assert!(
            d.ranges[0].first() > recorded.last(),
            "D {:?} is not above A's {recorded:?}",
            d.ranges[0]
        );
        assert!(
            d.epoch > epoch,
            "epoch {} after the drop, {epoch} before",
            d.epoch
        );
    }

    /// A handover whose trim raft-rs dropped (here: a transfer is already
    /// pending) and whose transfer then fails (the target is cut off) must
    /// not serve again from the term's first start: raises proposed before
    /// the trim could still commit above keys reloaded at once. It serves
    /// after a new start-of-term entry, under a new epoch (the segments it
    /// forgot leave holes, which no trim closed).
    #[test]
    fn a_handover_whose_trim_was_dropped_serves_again_after_a_new_start() {
        let (mut sim, l) = quiet_cluster(5);
        let before = send_call(&mut sim, l, 0, 1, None);
        let before = answer(&mut sim, before).expect("a call before the handover");
        let (leader, target) = (l as u64 + 1, (l as u64 + 1) % 3 + 1);
        sim.net.cut = vec![(leader, target), (target, leader)];
        sim.slots[l]
            .node
            .as_mut()
            .expect("running")
            .raft_transfer_for_test(Some(target));
        let (reply, handover) = oneshot::channel();
        sim.slots[l]
            .tx
            .send(Input::TransferLeader {
                to: Some(target),
                reply,
            })
            .expect("the node is running");
        let ended = handover_ended(&mut sim, handover);
        assert!(ended.is_err(), "the transfer to a cut-off node succeeded");
        assert_eq!(sim.leader(), Some(l), "the leader kept its majority");

        let after = send_call(&mut sim, l, 0, 1, None);
        let after = answer(&mut sim, after).expect("served again after the handover");
        assert!(
            after.ranges[0].first() > before.ranges[0].last(),
            "{:?} after {:?}",
            after.ranges[0],
            before.ranges[0]
        );
        assert!(
            after.epoch > before.epoch,
            "served again under epoch {} (before: {}): without a new start",
            after.epoch,
            before.epoch
        );
    }

    /// A dense call's raise is in the log when a handover begins, and the
    /// leader is cut off before it learns that the raise committed, so the
    /// call is never answered. The followers hold the raise and elect a
    /// leader, which continues above it: a hole. The handover's trim must
    /// not have made that hand-off clean (the trim waits for the leader's
    /// raises to apply), so the epoch announces the hole. Found by the
    /// simulation's epoch check (seed 74 of three nodes).
    #[test]
    fn a_handover_trims_only_after_its_raises_are_answered() {
        let (mut sim, l) = quiet_cluster(7);
        let dense = DENSE_KEYS.start;
        let before = send_call(&mut sim, l, dense, 1, None);
        let before = answer(&mut sim, before).expect("a dense call before the handover");

        // The call's raise goes out, then the handover begins (its trim, if
        // proposed now, goes out after the raise). The network is not
        // stepped meanwhile.
        let lost = send_call(&mut sim, l, dense, 2, None);
        sim.run_node(l);
        let _handover = ask_transfer(&mut sim, l);
        sim.run_node(l);
        // What was sent arrives; nothing comes back to the leader.
        cut_off(&mut sim, l);
        let (_, next) = new_leader_serves(&mut sim, l, dense);
        let lost = answer(&mut sim, lost);
        assert!(lost.is_err(), "the cut-off leader answered: {lost:?}");
        let (last, first) = (before.ranges[0].last(), next.ranges[0].first());
        assert!(
            first > last + 1,
            "no hole ({first} after {last}): the raise did not reach the followers"
        );
        assert!(
            next.epoch > before.epoch,
            "{}..={} were never handed out, yet {first} came in epoch {}, as {last} did",
            last + 1,
            first - 1,
            next.epoch
        );
    }

    /// A dense call that arrives in the same batch of inputs as a handover
    /// request is reserved but not yet proposed when serving stops: it
    /// fails at once, as the other unanswered calls do, rather than waiting
    /// for the trim and the transfer; and its numbers, never proposed, are
    /// the next leader's next ones, under the same epoch (a clean
    /// hand-off).
    #[test]
    fn a_dense_call_reserved_as_a_handover_begins_fails_at_once_and_leaves_no_hole() {
        let (mut sim, l) = quiet_cluster(11);
        let dense = DENSE_KEYS.start;
        let before = send_call(&mut sim, l, dense, 1, None);
        let before = answer(&mut sim, before).expect("a dense call before the handover");

        let mut caught = send_call(&mut sim, l, dense, 2, Some("caught"));
        let handover = ask_transfer(&mut sim, l);
        sim.run_node(l);
        let caught = caught.try_recv();
        assert!(
            matches!(caught, Ok(Err(NodeError::NotLeader { .. }))),
            "the call reserved as the handover began is still waiting: {caught:?}"
        );

        handover_ended(&mut sim, handover).expect("the handover completes");
        let (_, next) = new_leader_serves(&mut sim, l, dense);
        assert_eq!(
            next.ranges[0].first(),
            before.ranges[0].last() + 1,
            "the new leader skipped the reserved numbers"
        );
        assert_eq!(
            next.epoch, before.epoch,
            "a clean hand-off changed the epoch"
        );
    }

    /// A dense call with a request id whose raise reached the followers
    /// but whose leader was cut off before answering: a retry on the next
    /// leader gets the recorded range, under the epoch it was allocated
    /// in, not the new leader's (which would hide the hole between that
    /// range and the new leader's numbers: the calls of the old epoch that
    /// no one answered).
    #[test]
    fn a_retry_after_a_take_over_gets_the_epoch_its_numbers_came_in() {
        let (mut sim, l) = quiet_cluster(9);
        let dense = DENSE_KEYS.start;
        let before = send_call(&mut sim, l, dense, 1, None);
        let before = answer(&mut sim, before).expect("a dense call before the take-over");

        // The call's raise goes out; then nothing comes back to the leader.
        let first = send_call(&mut sim, l, dense, 2, Some("retried"));
        sim.run_node(l);
        cut_off(&mut sim, l);
        let (n, fresh) = new_leader_serves(&mut sim, l, dense);
        assert!(
            answer(&mut sim, first).is_err(),
            "the cut-off leader answered"
        );
        assert!(fresh.epoch > before.epoch, "a take-over kept the epoch");

        let retry = send_call(&mut sim, n, dense, 2, Some("retried"));
        let retry = answer(&mut sim, retry).expect("the retry on the new leader");
        assert_eq!(
            retry.ranges[0].first(),
            before.ranges[0].last() + 1,
            "the retry did not get the recorded range"
        );
        assert_eq!(
            retry.epoch, before.epoch,
            "the retry's numbers came in epoch {}, but it got epoch {} (the new leader's is {})",
            before.epoch, retry.epoch, fresh.epoch
        );
        // The answer says where it came from, so that a frontend can tell
        // the hole below it (the old epoch's unanswered calls) from a lost
        // message; the fresh allocation says it is not.
        assert!(retry.replayed, "the retry was not marked replayed");
        assert!(!fresh.replayed && !before.replayed);
    }

    /// A three-node cluster without faults or clients, run for 2 s; and
    /// the slot of its leader.
    fn quiet_cluster(seed: u64) -> (Sim, usize) {
        let cfg = SimConfig {
            faults: false,
            clients: 0,
            ..SimConfig::new(3)
        };
        let mut sim = Sim::new(seed, cfg);
        while sim.now < 2_000 {
            sim.step(false);
        }
        let l = sim.leader().expect("a leader after 2 s without faults");
        (sim, l)
    }

    /// Cuts slot `l` off from the other two nodes, both ways, for 3 s;
    /// what it sent before still arrives.
    fn cut_off(sim: &mut Sim, l: usize) {
        let leader = l as u64 + 1;
        sim.net.cut = (1..=3)
            .filter(|&o| o != leader)
            .flat_map(|o| [(leader, o), (o, leader)])
            .collect();
        sim.net.heal_at = sim.now + 3_000;
    }

    /// Steps until a leader other than slot `old` answers a call for one
    /// number of `key`: that leader's slot, and its answer.
    fn new_leader_serves(sim: &mut Sim, old: usize, key: usize) -> (usize, Grant) {
        for _ in 0..200 {
            if let Some(n) = sim.leader().filter(|&n| n != old) {
                let rx = send_call(sim, n, key, 1, None);
                if let Ok(g) = answer(sim, rx) {
                    return (n, g);
                }
            }
            let now = sim.now;
            step_until(sim, now, 20);
        }
        panic!("no other leader served within 4 s");
    }

    /// Asks slot `i`'s node for one number of each of `keys` at once; the
    /// answers, in order, once all have come.
    fn call_each(sim: &mut Sim, i: usize, keys: &[usize]) -> Vec<Result<Grant, NodeError>> {
        let calls: Vec<_> = keys
            .iter()
            .map(|&k| send_call(sim, i, k, 1, None))
            .collect();
        calls.into_iter().map(|rx| answer(sim, rx)).collect()
    }

    /// Asks slot `l`'s node to hand its leadership over (to whichever
    /// follower it picks); the handover's answer comes on the receiver.
    fn ask_transfer(sim: &mut Sim, l: usize) -> oneshot::Receiver<Result<(), NodeError>> {
        let (reply, rx) = oneshot::channel();
        sim.slots[l]
            .tx
            .send(Input::TransferLeader { to: None, reply })
            .expect("the node is running");
        rx
    }

    /// A follower wins an election in the same batch of inputs that asks
    /// it to hand its leadership over: raft-rs makes it leader while the
    /// batch is stepped, and the allocator learns of it only after. The
    /// handover must still end (it trims nothing and transfers), not wait
    /// for good on a trim that the new leadership's start had dropped.
    #[test]
    fn a_handover_asked_in_the_batch_that_won_the_election_ends() {
        let (mut sim, l) = quiet_cluster(11);
        let f = (l + 1) % 3;
        let other = 3 - l - f;
        let status = sim.slots[f].node.as_ref().expect("running").status();
        // The leader's TimeoutNow: the follower campaigns at once.
        let mut timeout_now = Message::default();
        timeout_now.set_msg_type(MessageType::MsgTimeoutNow);
        timeout_now.from = l as u64 + 1;
        timeout_now.to = f as u64 + 1;
        timeout_now.term = status.term;
        sim.slots[f]
            .tx
            .send(Input::Raft(Box::new(timeout_now)))
            .expect("the node is running");
        sim.run_node(f);
        // One batch: the vote that makes it leader, then the transfer.
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVoteResponse);
        vote.from = other as u64 + 1;
        vote.to = f as u64 + 1;
        vote.term = status.term + 1;
        sim.slots[f]
            .tx
            .send(Input::Raft(Box::new(vote)))
            .expect("the node is running");
        let handover = ask_transfer(&mut sim, f);
        sim.run_node(f);
        let led = sim.slots[f].node.as_ref().expect("running").status();
        assert_eq!(
            (led.term, led.leader_id),
            (status.term + 1, f as u64 + 1),
            "the forged vote did not make the follower leader"
        );
        let ended = handover_ended(&mut sim, handover);
        assert!(ended.is_ok(), "the handover ended {ended:?}");
        let (_, served) = new_leader_serves(&mut sim, f, 0);
        assert!(served.ranges[0].first() > 0);
    }

    /// Steps the simulation until handover `rx` answers, at most 3 s.
    fn handover_ended(
        sim: &mut Sim,
        mut rx: oneshot::Receiver<Result<(), NodeError>>,
    ) -> Result<(), NodeError> {
        for _ in 0..3_000 {
            if let Ok(r) = rx.try_recv() {
                return r;
            }
            sim.step(false);
        }
        panic!("the handover did not end within 3 s");
    }

    /// Once a leader other than slot `old` serves all `keys`, each one's
    /// next number follows its `last` grant, under the same epoch: no
    /// hole, and none announced.
    fn next_leader_continues(sim: &mut Sim, old: usize, keys: &[usize], last: &[Grant]) {
        let mut after = Vec::new();
        for _ in 0..100 {
            if let Some(n) = sim.leader().filter(|&n| n != old) {
                let answers = call_each(sim, n, keys);
                if answers.iter().all(Result::is_ok) {
                    after = answers.into_iter().map(Result::unwrap).collect();
                    break;
                }
            }
            let now = sim.now;
            step_until(sim, now, 20);
        }
        assert!(
            !after.is_empty(),
            "no new leader served all keys within 2 s"
        );
        for ((k, b), a) in keys.iter().zip(last).zip(&after) {
            assert_eq!(
                (a.ranges[0].first(), a.epoch),
                (b.ranges[0].last() + 1, b.epoch),
                "{:?}: the next leader's first number and epoch",
                sim.keys[*k]
            );
        }
    }

    /// A handover of more keys than a part of a trim holds trims them in
    /// parts and transfers after the last: the next leader continues every
    /// key from the last number handed out, under the same epoch (the
    /// hand-off was clean, so no hole may have opened).
    #[test]
    fn a_handover_trims_in_parts_and_the_next_leader_continues_every_key() {
        let cfg = SimConfig {
            faults: false,
            clients: 0,
            ..SimConfig::new(3)
        };
        let mut sim = Sim::new(7, cfg);
        step_until(&mut sim, 0, 2_000);
        let l = sim.leader().expect("a leader after 2 s without faults");
        let keys: Vec<usize> = SEGMENTED_KEYS.chain(COLD_KEYS).collect();
        let before: Vec<Grant> = call_each(&mut sim, l, &keys)
            .into_iter()
            .map(|r| r.expect("a call before the handover"))
            .collect();
        let parts_before = sim.slots[l].node.as_ref().expect("running").trim_parts;
        let handover = ask_transfer(&mut sim, l);
        handover_ended(&mut sim, handover).expect("the handover succeeded");
        let parts = sim.slots[l].node.as_ref().expect("running").trim_parts - parts_before;
        assert_eq!(
            parts,
            keys.len().div_ceil(SIM_TRIM_PART_KEYS) as u64,
            "parts of the trim of {} keys",
            keys.len()
        );
        next_leader_continues(&mut sim, l, &keys, &before);
    }

    /// A leader about to hand over first releases the keys not used
    /// lately while it goes on serving the others; then it trims what is
    /// left and transfers. Every key continues on the next leader from its
    /// last number, under the same epoch.
    #[test]
    fn a_handover_releases_idle_keys_while_serving_then_trims_the_rest() {
        let cfg = SimConfig {
            faults: false,
            clients: 0,
            ..SimConfig::new(3)
        };
        let mut sim = Sim::new(11, cfg);
        step_until(&mut sim, 0, 2_000);
        let l = sim.leader().expect("a leader after 2 s without faults");
        let keys: Vec<usize> = SEGMENTED_KEYS.chain(COLD_KEYS).collect();
        let mut last: Vec<Grant> = call_each(&mut sim, l, &keys)
            .into_iter()
            .map(|r| r.expect("a call before the handover"))
            .collect();
        // Idle past the handover's threshold, not yet the idle sweep's.
        let now = sim.now;
        step_until(&mut sim, now, SIM_HANDOVER_IDLE_MS + 50);
        // One key in use.
        let hot = send_call(&mut sim, l, keys[0], 1, None);
        last[0] = answer(&mut sim, hot).expect("a call before the handover");
        let node = sim.slots[l].node.as_ref().expect("running");
        let (released_before, parts_before) = (node.keys_released, node.trim_parts);
        let handover = ask_transfer(&mut sim, l);
        // Sent after the transfer: served, as the leader releases the rest.
        let hot = send_call(&mut sim, l, keys[0], 1, None);
        last[0] = answer(&mut sim, hot).expect("a call served while releasing");
        handover_ended(&mut sim, handover).expect("the handover succeeded");
        let node = sim.slots[l].node.as_ref().expect("running");
        // Each key released or trimmed (a part holds one key here), the
        // key in use trimmed. (One pass over the keys may miss a few: a
        // release moves the last key into the released one's place, behind
        // the pass; they are trimmed.)
        let released = node.keys_released - released_before;
        let trimmed = node.trim_parts - parts_before;
        assert!(
            released >= 1 && trimmed >= 1 && released + trimmed == keys.len() as u64,
            "{released} keys released before the trim, {trimmed} trimmed, of {}",
            keys.len()
        );
        next_leader_continues(&mut sim, l, &keys, &last);
    }

    /// Steps until the leader has sent `n` snapshots since they were held
    /// (up to 3 s): the newest.
    fn held_snapshot(sim: &mut Sim, n: usize) -> (u64, Message, u64) {
        let since = sim.now;
        while sim.net.held_snapshots.as_ref().map_or(0, Vec::len) < n {
            assert!(sim.now < since + 3_000, "snapshot send {n} never came");
            sim.step(false);
        }
        sim.net.held_snapshots.as_ref().expect("held")[n - 1].clone()
    }

    /// Reports to the sender of `held` that its send went out (`ok`) or not.
    fn report_snapshot(sim: &mut Sim, (from, msg, send): &(u64, Message, u64), ok: bool) {
        let report = SnapshotReport::of(msg, *send, ok);
        let _ = sim.slots[*from as usize - 1]
            .tx
            .send(Input::SnapshotSent(report));
    }

    /// A three-node simulation whose leader's log has moved past a
    /// follower it could not reach, and the first snapshot send to that
    /// follower, held (`Net::held_snapshots`) once the link is back: the
    /// simulation, the leader's slot, the follower's slot, and the send.
    fn first_snapshot_send_held(seed: u64) -> (Sim, usize, usize, (u64, Message, u64)) {
        let (mut sim, f, _) = with_a_follower_cut_off(seed);
        let l = sim.leader().expect("a leader");
        // Dense calls, an entry each: the leader's log moves past the
        // follower's by more than it keeps.
        for _ in 0..250 {
            let rx = send_call(&mut sim, l, 3, 1, None);
            answer(&mut sim, rx).expect("the leader serves");
        }
        sim.net.held_snapshots = Some(Vec::new());
        sim.net.cut.clear();
        let first = held_snapshot(&mut sim, 1);
        (sim, l, f, first)
    }

    /// The index of a held snapshot send.
    fn held_index((_, msg, _): &(u64, Message, u64)) -> u64 {
        msg.get_snapshot().get_metadata().index
    }

    /// Steps the simulation 1 s: how many snapshot sends were held by then.
    fn sends_after_a_second(sim: &mut Sim) -> usize {
        let now = sim.now;
        step_until(sim, now, 1_000);
        sim.net.held_snapshots.as_ref().map_or(0, Vec::len)
    }

    /// A report on an earlier send of a snapshot that comes after raft-rs
    /// sent it again (an aborted send's, when a peer's address changes)
    /// leaves the send under way alone. Matched by follower and snapshot
    /// alone, it ended that send too, and raft-rs sent the snapshot a
    /// third time.
    #[test]
    fn a_late_report_on_an_earlier_snapshot_send_is_ignored() {
        let (mut sim, l, f, first) = first_snapshot_send_held(5);
        report_snapshot(&mut sim, &first, false);
        let second = held_snapshot(&mut sim, 2);
        assert_eq!(held_index(&second), held_index(&first), "another snapshot");
        assert_ne!(second.2, first.2, "two sends, one number");

        report_snapshot(&mut sim, &first, false);
        let sent = sends_after_a_second(&mut sim);
        assert_eq!(sent, 2, "the late report ended the send under way");

        // The send under way arrives, and its own report is taken.
        let (from, msg, _) = second.clone();
        sim.net.held_snapshots = None;
        sim.net.seq += 1;
        sim.net
            .queue
            .insert((sim.now + 1, sim.net.seq), (from, msg));
        report_snapshot(&mut sim, &second, true);
        let since = sim.now;
        loop {
            let follower = sim.slots[f].node.as_ref().expect("running");
            let leader = sim.slots[l].node.as_ref().expect("running").status();
            if follower.snapshots_installed == 1
                && follower.status().last_index == leader.last_index
            {
                break;
            }
            assert!(sim.now < since + 3_000, "the follower never caught up");
            sim.step(false);
        }
    }

    /// The same late report, read in the same batch of inputs as the
    /// heartbeat response that made raft-rs send the snapshot again: the
    /// new send is not numbered yet (it waits in raft-rs's queue until the
    /// batch's Ready), and the report must not be taken for it.
    #[test]
    fn a_late_report_behind_the_answer_that_resends_is_ignored() {
        let (mut sim, l, f, first) = first_snapshot_send_held(5);
        let (leader, follower) = (l as u64 + 1, f as u64 + 1);
        // No answers from the follower but the one below.
        sim.net.cut.push((leader, follower));
        let now = sim.now;
        step_until(&mut sim, now, 50);
        report_snapshot(&mut sim, &first, false);
        sim.run_node(l);

        let mut answer = Message::default();
        answer.set_msg_type(MessageType::MsgHeartbeatResponse);
        answer.from = follower;
        answer.to = leader;
        answer.term = sim.slots[l].node.as_ref().expect("running").status().term;
        let tx = &sim.slots[l].tx;
        tx.send(Input::Raft(Box::new(answer))).expect("running");
        let late = SnapshotReport::of(&first.1, first.2, false);
        tx.send(Input::SnapshotSent(late)).expect("running");
        sim.run_node(l);
        let second = held_snapshot(&mut sim, 2);
        assert_eq!(held_index(&second), held_index(&first), "another snapshot");

        sim.net.cut.clear();
        let sent = sends_after_a_second(&mut sim);
        assert_eq!(sent, 2, "the late report ended the send under way");
    }

    /// A heartbeat addressed to another node (a peer holding this node's
    /// address for that one) is dropped: stepped, it would commit that
    /// node's index on this log, past its end (raft-rs panics) or over a
    /// stale tail.
    #[test]
    fn a_message_for_another_node_is_not_stepped() {
        let (mut sim, l) = quiet_cluster(3);
        let f = (l + 1) % 3;
        let other = (l + 2) % 3;
        let status = |sim: &Sim| sim.slots[f].node.as_ref().expect("running").status();
        let before = status(&sim);
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        heartbeat.from = l as u64 + 1;
        heartbeat.to = other as u64 + 1;
        heartbeat.term = before.term;
        heartbeat.commit = before.last_index + 1_000;
        sim.slots[f]
            .tx
            .send(Input::Raft(Box::new(heartbeat)))
            .expect("the node is running");
        sim.run_node(f);
        let after = status(&sim);
        assert_eq!(after.commit_index, before.commit_index);
    }

    /// A leader under a lease gets a heartbeat of the next term (from a
    /// follower that a leadership transfer elected, which a transfer may do
    /// through any lease), then a call, in one batch of inputs: raft-rs
    /// steps down on the heartbeat, and the call must not be answered from
    /// the old term's memory, though the allocator learns of the step down
    /// only after the batch.
    #[test]
    fn a_lease_ends_when_raft_steps_down_within_a_batch_of_inputs() {
        let cfg = SimConfig {
            faults: false,
            lease: true,
            ..SimConfig::new(3)
        };
        let mut sim = Sim::new(7, cfg);
        while sim.now < 3_000 {
            sim.step(false);
        }
        let l = sim.leader().expect("a leader after 3 s without faults");
        let under_lease = call_in_one_run(&mut sim, l, 0);
        assert!(
            matches!(under_lease, Some(Ok(_))),
            "the leader does not answer at once under its lease: {under_lease:?}"
        );
        let term = sim.slots[l].node.as_ref().expect("running").status().term;
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        heartbeat.to = l as u64 + 1;
        heartbeat.from = (l as u64 + 1) % 3 + 1;
        heartbeat.term = term + 1;
        sim.slots[l]
            .tx
            .send(Input::Raft(Box::new(heartbeat)))
            .expect("the node is running");
        let after = call_in_one_run(&mut sim, l, 0);
        assert!(
            matches!(after, Some(Err(NodeError::NotLeader { .. }))),
            "a call after the step down was answered {after:?}"
        );
    }
}
