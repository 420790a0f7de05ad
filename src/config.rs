//! Typed configuration: a TOML file (or the embedded single-node default),
//! overridden by command-line flags and `SEQD_*` environment variables.
//! [`Config::validate`] names the field of the first problem it finds.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::{Clock as _, Mode, NamespaceSpec, Namespaces, MAX_SEQUENCE};

/// Most `node.worker_threads` accepted (tokio's own limit is higher; a
/// larger number is a typo).
pub const MAX_WORKER_THREADS: usize = 1024;

/// Upper bound of `raft.refill_batch_ms`: well under the half second of
/// headroom a refill asked for ahead of need has by default.
pub const MAX_REFILL_BATCH_MS: u64 = 100;

/// Longest election timeout (`raft.tick_ms` x `raft.election_ticks`): a
/// node records the vote promise it makes from it and keeps it across
/// restarts, so a typo's hours without a leader would outlast its fix.
pub const MAX_ELECTION_TIMEOUT_MS: u64 = 60_000;

/// Largest `raft.max_size_per_msg`: an append message travels in one frame
/// of at most [`crate::raft::transport::MAX_PEER_MESSAGE`], and raft-rs
/// may exceed the setting by an entry.
pub const MAX_SIZE_PER_MSG: u64 = 64 << 20;

/// Farthest `snowflake.fence_ahead_ms` reaches: after a restart a node
/// stamps IDs from its fence on, so a day's fence is a day ahead.
pub const MAX_FENCE_AHEAD_MS: u64 = 60_000;

/// Largest backward step `snowflake.max_rollback_ms` may ride.
pub const MAX_ROLLBACK_MS: u64 = 60_000;

/// Longest `snowflake.trust_forward_step_ms`.
pub const MAX_TRUST_FORWARD_STEP_MS: u64 = 3_600_000;

/// The single-node configuration used when no file is given.
pub const EMBEDDED_SINGLE: &str = include_str!("../raft-config/single.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    /// Every voter of the initial cluster, this node included. Empty means a
    /// single-node cluster of this node alone.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub raft: RaftConfig,
    pub namespaces: Vec<NamespaceConfig>,
    #[serde(default)]
    pub snowflake: SnowflakeConfig,
    #[serde(default)]
    pub testing: TestingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Prometheus exposition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the `/metrics` HTTP endpoint (`ip:port`); none disables it.
    pub listen: Option<String>,
}

/// Snowflake ID layout and clock guards. The layout MUST be the same on
/// every node of a cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnowflakeConfig {
    /// Custom epoch, Unix ms (default 2024-01-01T00:00:00Z).
    pub epoch_ms: u64,
    pub time_bits: u32,
    pub worker_bits: u32,
    pub sequence_bits: u32,
    /// How far ahead of the clock a fence renewal reaches.
    pub fence_ahead_ms: u64,
    /// Renew once the fence is less than this far ahead.
    pub renew_before_ms: u64,
    /// Largest backward clock step carried on the logical clock; larger
    /// steps fail calls with FAILED_PRECONDITION until the clock catches up.
    pub max_rollback_ms: u64,
    /// A forward clock step larger than `max_rollback_ms` is believed only
    /// once it has held this long; until then IDs and fences go on from
    /// the time before it, on the monotonic clock. 0: believed at once.
    pub trust_forward_step_ms: u64,
    /// How far this node's time may run past the latest time fence another
    /// node committed (the cluster's time plus a fence's reach) before it
    /// neither issues IDs nor renews its fence: a clock set ahead would
    /// otherwise stamp IDs ahead of every other node and commit a fence the
    /// node must wait out once the clock is set right. 0: no check.
    pub max_ahead_of_cluster_ms: u64,
    /// Largest `count` of one NextIds call.
    pub max_count: u32,
}

impl Default for SnowflakeConfig {
    fn default() -> Self {
        Self {
            epoch_ms: 1_704_067_200_000,
            time_bits: 41,
            worker_bits: 10,
            sequence_bits: 12,
            fence_ahead_ms: 3_000,
            renew_before_ms: 2_000,
            max_rollback_ms: 1_000,
            trust_forward_step_ms: 60_000,
            max_ahead_of_cluster_ms: 2_000,
            max_count: 100_000,
        }
    }
}

/// Settings for tests only. Never enable in production.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Accept Admin.InjectFault (clock shifts, network isolation).
    pub allow_fault_injection: bool,
    /// Start with the clock shifted by this many ms.
    pub clock_offset_ms: i64,
    /// Exit (status [`STOPPED_IN_INSTALL`]) inside the next install of a
    /// snapshot through a table file, after this step: as a crash there
    /// would, for a test of the install's resumption.
    pub stop_in_snapshot_install: Option<InstallStep>,
}

/// The steps of a snapshot install through a table file that
/// `testing.stop_in_snapshot_install` can stop after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum InstallStep {
    /// The table file written and the install marked.
    Staged,
    /// The state family replaced by the file, the log not yet.
    Ingested,
}

/// The exit status of a node stopped by `testing.stop_in_snapshot_install`.
pub const STOPPED_IN_INSTALL: i32 = 86;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Raft node id, unique in the cluster, never reused.
    pub id: u64,
    /// gRPC address for clients and peers.
    pub listen: String,
    /// Where RocksDB keeps this node's log and state.
    pub data_dir: PathBuf,
    /// Join an existing cluster: start with no configuration and wait for
    /// the leader to add this node (Admin.AddNode), instead of forming a new
    /// cluster from `peers`.
    #[serde(default)]
    pub join: bool,
    /// Threads running gRPC, the peer transport and the Raft loop (tokio
    /// workers); 0: one per CPU but one, at least one (see
    /// [`NodeConfig::runtime_workers`]).
    #[serde(default)]
    pub worker_threads: usize,
    /// The cluster's shared secret. When set, a node takes Raft streams
    /// and Admin changes (AddNode, RemoveNode, TransferLeader,
    /// InjectFault) only from callers that send it (`seqd-secret`
    /// metadata), and names it to its peers; every node of a cluster sets
    /// the same. Prefer `SEQD_SECRET` to a file. Unset: no check (the
    /// network must keep strangers out).
    #[serde(default)]
    pub secret: Option<SecretText>,
}

/// A secret as configured: its `Debug` does not show it, so that printing
/// a configuration never prints the secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl SecretText {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(..)")
    }
}

impl NodeConfig {
    /// The tokio workers to run on a machine (or cgroup) with `cpus` CPUs.
    /// By default one CPU is left to what runs beside them: the log's
    /// fsync thread, RocksDB's flushes, the kernel's network stack (and,
    /// where nodes share a small machine, the other nodes and the clients).
    /// A call costs a few microseconds, so one worker serves well over
    /// 100,000 calls/s; on two cores a second one made each batch's trip
    /// through the connection, stream and node tasks a hand-off between
    /// threads, which cost half again as much CPU per call (3.4 against 2.2
    /// µs at 32 callers) for a lower peak (README, "Worker threads").
    pub fn runtime_workers(&self, cpus: usize) -> usize {
        match self.worker_threads {
            0 => cpus.saturating_sub(1).max(1),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    /// Address other nodes and clients use to reach this peer: `ip:port` or
    /// `hostname:port`.
    pub addr: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Length of one Raft tick.
    pub tick_ms: u64,
    /// Election timeout in ticks (randomized by raft-rs in [n, 2n)).
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Applied entries kept in the log before it is compacted.
    pub compact_threshold: u64,
    /// How long a call may wait for the cluster before failing.
    pub request_timeout_ms: u64,
    /// Largest append message, in bytes.
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// How a leader makes sure it still leads before answering (I2).
    pub read_mode: ReadMode,
    /// Which followers a leadership check asks.
    pub read_round_peers: ReadRoundPeers,
    /// Refills no call waits for go to the log at most this often, in one
    /// entry (each entry is a synced write on every node and a
    /// replication round). A refill a call waits for, or whose key has
    /// used half the room it had left when the refill was asked for, goes
    /// at once. 0: every refill as soon as it is asked for.
    pub refill_batch_ms: u64,
}

/// Followers a ReadIndex round's heartbeat goes to. Either way a round
/// completes on a majority's acknowledgements; this only decides who does
/// the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReadRoundPeers {
    /// Just enough for a majority: the followers that answered fastest when
    /// last asked all (asked all again when they answer slowly). Spares the
    /// other followers' CPU, which matters when nodes share cores.
    #[default]
    Majority,
    /// Every follower: the fastest majority's answers complete the round, a
    /// hedge against one slow follower, at the cost of every follower
    /// handling every round.
    All,
}

/// The leadership check before answering from memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ReadMode {
    /// A ReadIndex heartbeat round per batch of calls, started after they
    /// arrived. Trusts no clock.
    #[default]
    ReadIndex,
    /// A completed round also grants a lease of 0.8 x (election_ticks - 2)
    /// ticks, counted from when it started, during which calls are answered
    /// at once. Trusts that the nodes' monotonic clocks run at nearly the same
    /// rate; never trusts wall clocks.
    Lease,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_threshold: 10_000,
            request_timeout_ms: 3_000,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            read_mode: ReadMode::ReadIndex,
            read_round_peers: ReadRoundPeers::Majority,
            refill_batch_ms: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    #[serde(default = "default_mode")]
    pub mode: ModeConfig,
    /// Smallest segment a key's refill raises its ceiling by (segmented
    /// mode; a dense namespace raises by each call's count and ignores
    /// the three settings here).
    #[serde(default = "default_step_min")]
    pub step_min: u64,
    /// Largest segment.
    #[serde(default = "default_step_max")]
    pub step_max: u64,
    /// The refill period the segment's size adapts to.
    #[serde(default = "default_refill_interval_ms")]
    pub refill_interval_ms: u64,
    #[serde(default = "default_max_count")]
    pub max_count: u32,
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
    #[serde(default = "default_max_value")]
    pub max_value: u64,
    /// Milliseconds without a call after which a key leaves the leader's
    /// memory (its unused room released through the log first, so no
    /// hole); 0 keeps every key until the next leader change.
    #[serde(default = "default_forget_idle_ms")]
    pub forget_idle_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    Segmented,
    Dense,
}

fn default_mode() -> ModeConfig {
    ModeConfig::Segmented
}
fn default_step_min() -> u64 {
    1_000
}
fn default_step_max() -> u64 {
    1_000_000
}
fn default_refill_interval_ms() -> u64 {
    1_000
}
fn default_max_count() -> u32 {
    10_000
}
fn default_max_key_bytes() -> usize {
    256
}
fn default_max_value() -> u64 {
    MAX_SEQUENCE
}
fn default_forget_idle_ms() -> u64 {
    600_000
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

/// Longest `raft.request_timeout_ms`: ten minutes.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 600_000;

/// Refuses `value` above `max`, naming `field`.
fn at_most(field: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(invalid(field, format!("must be at most {max}")));
    }
    Ok(())
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Values from flags or environment that replace those of the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub node_id: Option<u64>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `id=host:port,id=host:port,...`
    pub peers: Option<String>,
    pub tick_ms: Option<u64>,
    pub election_ticks: Option<usize>,
    pub compact_threshold: Option<u64>,
    pub read_mode: Option<ReadMode>,
    pub join: Option<bool>,
    pub clock_offset_ms: Option<i64>,
    pub allow_fault_injection: Option<bool>,
    pub stop_in_snapshot_install: Option<InstallStep>,
    pub metrics_listen: Option<String>,
    pub worker_threads: Option<usize>,
    pub secret: Option<SecretText>,
}

impl Config {
    /// Loads `path`, or the embedded single-node file when `None`, then
    /// applies overrides and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (origin, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
            ),
            None => (
                "embedded single.toml".to_string(),
                EMBEDDED_SINGLE.to_string(),
            ),
        };
        let mut cfg = Self::parse(&origin, &text)?;
        cfg.apply(overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn parse(origin: &str, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })
    }

    fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(id) = o.node_id {
            self.node.id = id;
        }
        if let Some(listen) = &o.listen {
            // A lone node named at its own listen address (as in the
            // embedded single-node file) is dialled there by members it
            // adds later: its address follows a new listen address, unless
            // peers are given too. One that binds every address (0.0.0.0,
            // [::]) is no one's to dial: the port follows, the host stays.
            let lone = o.peers.is_none()
                && self.peers.len() == 1
                && self.peers[0].id == self.node.id
                && self.peers[0].addr == self.node.listen;
            if lone {
                if let Ok(new) = listen.parse::<SocketAddr>() {
                    self.peers[0].addr = match self.peers[0].addr.rsplit_once(':') {
                        Some((host, _)) if new.ip().is_unspecified() => {
                            format!("{host}:{}", new.port())
                        }
                        _ => listen.clone(),
                    };
                }
            }
            self.node.listen = listen.clone();
        }
        if let Some(dir) = &o.data_dir {
            self.node.data_dir = dir.clone();
        }
        if let Some(peers) = &o.peers {
            self.peers = parse_peers(peers)?;
        }
        if let Some(t) = o.tick_ms {
            self.raft.tick_ms = t;
        }
        if let Some(t) = o.election_ticks {
            self.raft.election_ticks = t;
        }
        if let Some(t) = o.compact_threshold {
            self.raft.compact_threshold = t;
        }
        if let Some(m) = o.read_mode {
            self.raft.read_mode = m;
        }
        if let Some(j) = o.join {
            self.node.join = j;
        }
        if let Some(c) = o.clock_offset_ms {
            self.testing.clock_offset_ms = c;
        }
        if let Some(a) = o.allow_fault_injection {
            self.testing.allow_fault_injection = a;
        }
        if let Some(step) = o.stop_in_snapshot_install {
            self.testing.stop_in_snapshot_install = Some(step);
        }
        if let Some(l) = &o.metrics_listen {
            self.metrics.listen = Some(l.clone());
        }
        if let Some(w) = o.worker_threads {
            self.node.worker_threads = w;
        }
        if let Some(secret) = &o.secret {
            self.node.secret = Some(secret.clone());
        }
        Ok(())
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.node.id == 0 {
            return Err(invalid("node.id", "must be at least 1"));
        }
        parse_addr("node.listen", &self.node.listen)?;
        if let Some(l) = &self.metrics.listen {
            parse_addr("metrics.listen", l)?;
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(invalid("node.data_dir", "must not be empty"));
        }
        if let Some(secret) = &self.node.secret {
            check_secret(secret.expose())?;
        }
        if self.node.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "node.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS} (0: one per CPU but one)",
                    self.node.worker_threads
                ),
            ));
        }
        if self.peers.is_empty() {
            self.peers.push(PeerConfig {
                id: self.node.id,
                addr: self.node.listen.clone(),
            });
        }
        let mut ids = BTreeSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.id == 0 {
                return Err(invalid(format!("peers[{i}].id"), "must be at least 1"));
            }
            if !ids.insert(p.id) {
                return Err(invalid(
                    format!("peers[{i}].id"),
                    format!("{} appears twice", p.id),
                ));
            }
            check_host_port(&format!("peers[{i}].addr"), &p.addr)?;
        }
        if !ids.contains(&self.node.id) {
            return Err(invalid(
                "node.id",
                format!("{} is not among the peers' ids {:?}", self.node.id, ids),
            ));
        }
        let r = &self.raft;
        if r.tick_ms == 0 || r.tick_ms > 10_000 {
            return Err(invalid("raft.tick_ms", "must be between 1 and 10000"));
        }
        if r.heartbeat_ticks == 0 {
            return Err(invalid("raft.heartbeat_ticks", "must be at least 1"));
        }
        if r.read_mode == ReadMode::Lease && r.election_ticks < 5 {
            return Err(invalid(
                "raft.election_ticks",
                "must be at least 5 with read_mode = \"lease\" (the lease is 0.8 x (election_ticks - 2) ticks)",
            ));
        }
        // Two heartbeats at least within an election timeout: a leader
        // with check_quorum steps down when no majority answered within
        // one, so a single late answer must not cost it its leadership.
        if r.election_ticks < r.heartbeat_ticks.saturating_mul(2) {
            return Err(invalid(
                "raft.election_ticks",
                "must be at least twice raft.heartbeat_ticks",
            ));
        }
        let election_ms = r.tick_ms.saturating_mul(r.election_ticks as u64);
        if election_ms > MAX_ELECTION_TIMEOUT_MS {
            return Err(invalid(
                "raft.election_ticks",
                format!(
                    "{} ticks of {} ms is an election timeout of {election_ms} ms; at most \
                     {MAX_ELECTION_TIMEOUT_MS} (a node keeps the vote promise it makes from \
                     it across restarts)",
                    r.election_ticks, r.tick_ms
                ),
            ));
        }
        if r.compact_threshold < 2 {
            return Err(invalid("raft.compact_threshold", "must be at least 2"));
        }
        // Calls' deadlines are looked at once a tick: a shorter timeout
        // would act as a tick.
        if r.request_timeout_ms < r.tick_ms {
            return Err(invalid(
                "raft.request_timeout_ms",
                format!(
                    "must be at least raft.tick_ms ({} ms): deadlines are looked at once a tick",
                    r.tick_ms
                ),
            ));
        }
        // Ten minutes is far past any client's patience (the Rust client
        // gives up after 10 s): a call held longer holds its memory and
        // its caller's connection for nothing.
        at_most(
            "raft.request_timeout_ms",
            r.request_timeout_ms,
            MAX_REQUEST_TIMEOUT_MS,
        )?;
        // raft-rs allocates this many slots per peer; the transport queues
        // no more than PEER_QUEUE messages per peer anyway.
        let max_inflight = crate::raft::transport::PEER_QUEUE;
        if r.max_inflight_msgs == 0 || r.max_inflight_msgs > max_inflight {
            return Err(invalid(
                "raft.max_inflight_msgs",
                format!("must be between 1 and {max_inflight}"),
            ));
        }
        at_most(
            "raft.max_size_per_msg",
            r.max_size_per_msg,
            MAX_SIZE_PER_MSG,
        )?;
        if r.refill_batch_ms > MAX_REFILL_BATCH_MS {
            return Err(invalid(
                "raft.refill_batch_ms",
                format!("must be at most {MAX_REFILL_BATCH_MS} (refills are asked for half a segment ahead, about half of refill_interval_ms)"),
            ));
        }
        let sf = &self.snowflake;
        let layout = self
            .layout()
            .map_err(|e| invalid("snowflake", e.to_string()))?;
        let now = crate::core::SystemClock::new(self.testing.clock_offset_ms).now_ms();
        if layout.years_left(now) <= 0.0 {
            return Err(invalid(
                "snowflake.epoch_ms",
                "the layout's time bits ran out: IDs would repeat; start a new cluster with a later epoch or more time_bits (a data directory keeps the layout it started with)",
            ));
        }
        if sf.epoch_ms > now {
            return Err(invalid("snowflake.epoch_ms", "must not be in the future"));
        }
        if sf.fence_ahead_ms < 100 || sf.fence_ahead_ms > MAX_FENCE_AHEAD_MS {
            return Err(invalid(
                "snowflake.fence_ahead_ms",
                format!("must be between 100 and {MAX_FENCE_AHEAD_MS}"),
            ));
        }
        if sf.renew_before_ms == 0 || sf.renew_before_ms >= sf.fence_ahead_ms {
            return Err(invalid(
                "snowflake.renew_before_ms",
                "must be between 1 and fence_ahead_ms - 1",
            ));
        }
        // Renewals are looked at once a tick: the fence must not run out
        // between two looks and the renewal's commit.
        if sf.renew_before_ms < 2 * r.tick_ms {
            return Err(invalid(
                "snowflake.renew_before_ms",
                format!(
                    "must be at least twice raft.tick_ms ({} ms): renewals are looked at once a \
                     tick",
                    r.tick_ms
                ),
            ));
        }
        at_most(
            "snowflake.max_rollback_ms",
            sf.max_rollback_ms,
            MAX_ROLLBACK_MS,
        )?;
        at_most(
            "snowflake.trust_forward_step_ms",
            sf.trust_forward_step_ms,
            MAX_TRUST_FORWARD_STEP_MS,
        )?;
        let workers = 1u64 << sf.worker_bits;
        if (self.peers.len() as u64) > workers {
            return Err(invalid(
                "snowflake.worker_bits",
                format!(
                    "{} bits name {workers} worker ids, fewer than the {} peers",
                    sf.worker_bits,
                    self.peers.len()
                ),
            ));
        }
        // A node that stops hearing the others (cut off, paused) must hit
        // its own fence before its right clock could read as past theirs
        // (see core::snowflake::CLUSTER_FRESH_MS).
        let least_reach = crate::core::snowflake::CLUSTER_FRESH_MS + 1_500;
        if sf.max_ahead_of_cluster_ms != 0
            && sf.fence_ahead_ms.saturating_add(sf.max_ahead_of_cluster_ms) < least_reach
        {
            return Err(invalid(
                "snowflake.max_ahead_of_cluster_ms",
                format!(
                    "with fence_ahead_ms must add up to at least {least_reach} ms (or be 0, \
                     no check)"
                ),
            ));
        }
        // That check compares other nodes' fences only while news (heard
        // within CLUSTER_FRESH_MS); each node renews about once every
        // fence_ahead_ms - renew_before_ms, and a tick, and its renewal
        // takes a commit to be heard: between rarer renewals the check
        // would be off.
        let renew_every = sf.fence_ahead_ms - sf.renew_before_ms + r.tick_ms;
        let heard_within = crate::core::snowflake::CLUSTER_FRESH_MS - 500;
        if sf.max_ahead_of_cluster_ms != 0 && renew_every > heard_within {
            return Err(invalid(
                "snowflake.renew_before_ms",
                format!(
                    "fence_ahead_ms - renew_before_ms + raft.tick_ms is {renew_every} ms between \
                     a node's renewals; with max_ahead_of_cluster_ms set, at most \
                     {heard_within}, so that the others hear one while it is news"
                ),
            ));
        }
        if sf.max_count == 0 || sf.max_count > 1_000_000 {
            return Err(invalid(
                "snowflake.max_count",
                "must be between 1 and 1000000",
            ));
        }
        // A call's IDs take count / per_ms milliseconds of stamps, all under
        // the fence, which is renewed once less than renew_before_ms is left.
        // A call needing more than half of that could find the fence too
        // near on every node, every time, and be refused UNAVAILABLE ("retry
        // on another node") for good.
        let fits = layout.per_ms() * (sf.renew_before_ms / 2).max(1);
        if u64::from(sf.max_count) > fits {
            return Err(invalid(
                "snowflake.max_count",
                format!(
                    "{} IDs in one call take {} ms of timestamps at {} IDs per ms \
                     (sequence_bits = {}); at most {fits} fit in half of renew_before_ms \
                     ({} ms), so that no call waits on the fence's renewal",
                    sf.max_count,
                    u64::from(sf.max_count).div_ceil(layout.per_ms()),
                    layout.per_ms(),
                    sf.sequence_bits,
                    sf.renew_before_ms,
                ),
            ));
        }
        if self.namespaces.is_empty() {
            return Err(invalid("namespaces", "at least one namespace is required"));
        }
        let mut names = BTreeSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let field = |f: &str| format!("namespaces[{i}].{f}");
            let valid_name = !ns.name.is_empty()
                && ns.name.len() <= crate::core::types::MAX_NAMESPACE_BYTES
                && ns
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !valid_name {
                return Err(invalid(
                    field("name"),
                    format!(
                        "{:?} must be 1 to 64 characters of A-Z a-z 0-9 _ - .",
                        ns.name
                    ),
                ));
            }
            if !names.insert(ns.name.clone()) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} appears twice", ns.name),
                ));
            }
            if ns.step_min == 0 {
                return Err(invalid(field("step_min"), "must be at least 1"));
            }
            if ns.step_max < ns.step_min {
                return Err(invalid(field("step_max"), "must be at least step_min"));
            }
            if ns.refill_interval_ms == 0 {
                return Err(invalid(field("refill_interval_ms"), "must be at least 1"));
            }
            if ns.max_count == 0 || ns.max_count > 1_000_000 {
                return Err(invalid(field("max_count"), "must be between 1 and 1000000"));
            }
            if ns.max_key_bytes == 0 || ns.max_key_bytes > 4096 {
                return Err(invalid(
                    field("max_key_bytes"),
                    "must be between 1 and 4096",
                ));
            }
            if ns.forget_idle_ms != 0 && ns.forget_idle_ms < 1_000 {
                return Err(invalid(
                    field("forget_idle_ms"),
                    "must be 0 (never) or at least 1000",
                ));
            }
            if ns.max_value == 0 || ns.max_value > MAX_SEQUENCE {
                return Err(invalid(
                    field("max_value"),
                    format!("must be between 1 and {MAX_SEQUENCE} (i64::MAX)"),
                ));
            }
        }
        Ok(())
    }

    /// The Snowflake layout.
    pub fn layout(&self) -> Result<crate::core::Layout, crate::core::LayoutError> {
        let sf = &self.snowflake;
        crate::core::Layout::try_new(sf.epoch_ms, sf.time_bits, sf.worker_bits, sf.sequence_bits)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("node.listen", &self.node.listen)
    }

    /// Ids of the initial voters.
    pub fn voter_ids(&self) -> Vec<u64> {
        self.peers.iter().map(|p| p.id).collect()
    }

    pub fn peer_addr(&self, id: u64) -> Option<&str> {
        self.peers
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.addr.as_str())
    }

    pub fn namespaces(&self) -> Namespaces {
        Namespaces::new(
            self.namespaces
                .iter()
                .map(|n| NamespaceSpec {
                    name: n.name.clone(),
                    mode: match n.mode {
                        ModeConfig::Segmented => Mode::Segmented,
                        ModeConfig::Dense => Mode::Dense,
                    },
                    step_min: n.step_min,
                    step_max: n.step_max,
                    refill_interval_ms: n.refill_interval_ms,
                    max_count: n.max_count,
                    max_key_bytes: n.max_key_bytes,
                    max_value: n.max_value,
                    forget_idle_ms: n.forget_idle_ms,
                })
                .collect(),
        )
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an ip:port address")))
}

/// Longest cluster secret: a header value, sent on every peer stream.
pub const MAX_SECRET_BYTES: usize = 256;

/// A cluster secret travels as gRPC metadata: visible ASCII, no spaces,
/// 16 to [`MAX_SECRET_BYTES`] bytes (shorter is guessable).
pub fn check_secret(secret: &str) -> Result<(), ConfigError> {
    let field = "node.secret";
    if secret.is_empty() {
        // Refused rather than taken as "no secret": an empty variable is
        // more often a secret that went missing than a choice.
        return Err(invalid(
            field,
            "empty; to run without a secret, leave it (and SEQD_SECRET) unset",
        ));
    }
    if secret.len() < 16 || secret.len() > MAX_SECRET_BYTES {
        return Err(invalid(
            field,
            format!(
                "{} bytes; a secret has 16 to {MAX_SECRET_BYTES}",
                secret.len()
            ),
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            "only visible ASCII characters, without spaces (it is sent as gRPC metadata)",
        ));
    }
    Ok(())
}

/// `host:port`, where host may be a name (resolved when connecting), as in
/// a compose network, or an IPv6 address in brackets. Read as the peer
/// transport reads it (the authority of `http://{addr}`), so that an
/// address taken here is one it can connect to: with a port other than 0,
/// and nothing past it (`node4/x:7004` would be `node4:80`).
pub fn check_host_port(field: &str, s: &str) -> Result<(), ConfigError> {
    let bad = || invalid(field, format!("{s:?} is not a host:port address"));
    let uri: tonic::codegen::http::Uri = format!("http://{s}").parse().map_err(|_| bad())?;
    let authority = uri.authority().ok_or_else(bad)?;
    let whole = authority.as_str() == s && !s.contains('@');
    if !whole || authority.host().is_empty() || authority.port_u16().is_none_or(|p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

fn parse_peers(s: &str) -> Result<Vec<PeerConfig>, ConfigError> {
    // Given but empty (a compose file's `SEQD_PEERS: ${PEERS}` with the
    // variable unset) is a mistake, not "one node": that node would elect
    // itself and hand out numbers from 1 beside the real cluster.
    let peers: Vec<PeerConfig> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| invalid("peers", format!("{p:?} is not id=host:port")))?;
            let id = id
                .trim()
                .parse()
                .map_err(|_| invalid("peers", format!("{id:?} is not a node id")))?;
            Ok(PeerConfig {
                id,
                addr: addr.trim().to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if peers.is_empty() {
        return Err(invalid(
            "peers",
            "given but empty: name every node (id=host:port,...), or leave it unset for a single node",
        ));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(cfg.voter_ids(), vec![1]);
    }

    #[test]
    fn shipped_cluster_files_are_valid() {
        for n in 1..=3 {
            let path = PathBuf::from(format!(
                "{}/raft-config/node{n}.toml",
                env!("CARGO_MANIFEST_DIR")
            ));
            let cfg = Config::load(Some(&path), &Overrides::default()).unwrap();
            assert_eq!(cfg.node.id, n);
            assert_eq!(cfg.voter_ids(), vec![1, 2, 3]);
        }
    }

    #[test]
    fn refill_batches_default_to_5_ms_and_are_bounded() {
        let cfg = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(cfg.raft.refill_batch_ms, 5);
        let with = |ms: u64| {
            let text =
                EMBEDDED_SINGLE.replace("refill_batch_ms = 5", &format!("refill_batch_ms = {ms}"));
            let mut cfg = Config::parse("t", &text)?;
            cfg.validate().map(|()| cfg.raft.refill_batch_ms)
        };
        assert_eq!(with(0).unwrap(), 0);
        assert_eq!(with(MAX_REFILL_BATCH_MS).unwrap(), MAX_REFILL_BATCH_MS);
        let err = with(MAX_REFILL_BATCH_MS + 1).unwrap_err().to_string();
        assert!(err.contains("raft.refill_batch_ms"), "{err}");
    }

    #[test]
    fn read_rounds_ask_a_majority_unless_all_is_chosen() {
        let cfg = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(cfg.raft.read_round_peers, ReadRoundPeers::Majority);
        let with = |v: &str| {
            let text = EMBEDDED_SINGLE.replace(
                "read_mode = \"read_index\"",
                &format!("read_mode = \"read_index\"\nread_round_peers = \"{v}\""),
            );
            Config::parse("t", &text).map(|c| c.raft.read_round_peers)
        };
        assert_eq!(with("all").unwrap(), ReadRoundPeers::All);
        assert_eq!(with("majority").unwrap(), ReadRoundPeers::Majority);
        let err = with("some").unwrap_err().to_string();
        assert!(err.contains("some") && err.contains("majority"), "{err}");
    }

    #[test]
    fn a_clock_check_shorter_than_the_news_window_is_refused() {
        let with = |ahead: u64| {
            let text = format!(
                "{EMBEDDED_SINGLE}\n[snowflake]\nfence_ahead_ms = 1000\nrenew_before_ms = 500\n\
                 max_ahead_of_cluster_ms = {ahead}\n"
            );
            Config::parse("t", &text)?.validate()
        };
        let err = with(2_000).unwrap_err().to_string();
        assert!(err.contains("snowflake.max_ahead_of_cluster_ms"), "{err}");
        with(0).unwrap();
        with(3_000).unwrap();
    }

    #[test]
    fn worker_threads_default_to_all_cpus_but_one_and_are_bounded() {
        let cfg = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(cfg.node.worker_threads, 0);
        assert_eq!(cfg.node.runtime_workers(1), 1);
        assert_eq!(cfg.node.runtime_workers(2), 1);
        assert_eq!(cfg.node.runtime_workers(16), 15);
        let text = EMBEDDED_SINGLE.replace("[node]\n", "[node]\nworker_threads = 2\n");
        let mut cfg = Config::parse("t", &text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.node.worker_threads, 2);
        assert_eq!(cfg.node.runtime_workers(16), 2);
        let over = Overrides {
            worker_threads: Some(1),
            ..Overrides::default()
        };
        assert_eq!(Config::load(None, &over).unwrap().node.worker_threads, 1);
        let over = Overrides {
            worker_threads: Some(100_000),
            ..Overrides::default()
        };
        let err = Config::load(None, &over).unwrap_err().to_string();
        assert!(err.starts_with("node.worker_threads:"), "{err}");
    }

    #[test]
    fn read_mode_is_read_index_unless_lease_is_chosen() {
        let cfg = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(cfg.raft.read_mode, ReadMode::ReadIndex);
        let text = EMBEDDED_SINGLE.replace("read_mode = \"read_index\"", "read_mode = \"lease\"");
        assert_eq!(
            Config::parse("t", &text).unwrap().raft.read_mode,
            ReadMode::Lease
        );
        let bad = EMBEDDED_SINGLE.replace("read_mode = \"read_index\"", "read_mode = \"fast\"");
        let err = Config::parse("t", &bad).unwrap_err().to_string();
        assert!(err.contains("read_mode") || err.contains("fast"), "{err}");
    }

    /// Peer addresses are what the transport can connect to: names, IPv4
    /// and bracketed IPv6 with a port; not what `http://{addr}` would read
    /// otherwise, or not at all.
    #[test]
    fn a_peer_address_is_one_the_transport_can_use() {
        for good in [
            "node3:7003",
            "127.0.0.1:7000",
            "[::1]:7000",
            "seqd-2.internal:65535",
        ] {
            assert!(check_host_port("addr", good).is_ok(), "{good}");
        }
        for bad in [
            "localhost",
            ":7000",
            "node3:",
            "node3:0",
            "node3:65536",
            "::1:7000",
            "a:b:7000",
            "node4/x:7004",
            "node4:7004/x",
            "user@node4:7004",
            "node 4:7004",
            "h\u{1}x:7000",
            "n\u{f6}de:7000",
            "node4:7004?x",
        ] {
            let err = check_host_port("addr", bad).unwrap_err().to_string();
            assert!(err.contains("is not a host:port address"), "{bad}: {err}");
        }
    }

    /// A secret travels as gRPC metadata: visible ASCII, 16 to 256 bytes;
    /// a refusal names the field, never the secret.
    #[test]
    fn a_secret_is_sent_as_metadata_and_long_enough_to_matter() {
        let load = |secret: &str| {
            let o = Overrides {
                secret: Some(SecretText::new(secret)),
                ..Overrides::default()
            };
            Config::load(None, &o).map(|c| c.node.secret.map(|s| s.expose().to_string()))
        };
        assert_eq!(
            load("0123456789abcdef").unwrap().as_deref(),
            Some("0123456789abcdef")
        );
        load(&"x".repeat(MAX_SECRET_BYTES)).unwrap();
        for bad in [
            "short",
            "0123456789abcde",
            "with a space in it, long enough",
            "tab\there-long-enough-yes",
            "non-ascii-ééééééééééé",
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.starts_with("node.secret:"), "{bad:?}: {err}");
            assert!(
                !err.contains(bad),
                "the secret itself is not repeated: {err}"
            );
        }
        let err = load("").unwrap_err().to_string();
        assert!(err.starts_with("node.secret: empty"), "{err}");
        // Printed, a configuration (and the node's copy) does not show it.
        let o = Overrides {
            secret: Some(SecretText::new("do-not-print-this-one")),
            ..Overrides::default()
        };
        let printed = format!("{:?} {o:?}", Config::load(None, &o).unwrap());
        assert!(!printed.contains("do-not-print"), "{printed}");
        let node_copy = crate::service::Secret::new(Some("do-not-print-this-one"));
        assert_eq!(format!("{node_copy:?}"), "Secret(set)");
        let err = load(&"x".repeat(MAX_SECRET_BYTES + 1)).unwrap_err();
        assert!(err.to_string().starts_with("node.secret:"), "{err}");
        assert_eq!(
            Config::load(None, &Overrides::default())
                .unwrap()
                .node
                .secret,
            None
        );
    }

    /// Values that parse, but with which a node would misbehave once
    /// running, are refused, naming the field; the boundary values pass.
    #[test]
    fn settings_that_would_misbehave_at_runtime_are_refused() {
        // The embedded configuration with `raft` lines in place of its own
        // and a `[snowflake]` section.
        let with = |raft: &str, snowflake: &str| {
            let given: Vec<&str> = raft.lines().filter_map(|l| l.split(' ').next()).collect();
            let kept: Vec<&str> = EMBEDDED_SINGLE
                .lines()
                .filter(|l| !given.contains(&l.split(' ').next().unwrap_or("")))
                .collect();
            let text = kept
                .join("\n")
                .replace("[raft]\n", &format!("[raft]\n{raft}\n"));
            let text = format!("{text}\n[snowflake]\n{snowflake}\n");
            Config::parse("t", &text).and_then(|mut c| c.validate())
        };
        let refused = |raft: &str, snowflake: &str, field: &str| {
            let err = with(raft, snowflake).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{field}:")), "{field}: {err}");
        };
        // A slow tick needs a fence renewed well ahead, and no news check.
        let slow = "fence_ahead_ms = 13000\nrenew_before_ms = 12000\nmax_ahead_of_cluster_ms = 0";

        // The election timeout, kept as a vote promise across restarts.
        let slow_tick = "tick_ms = 6000\nrequest_timeout_ms = 6000";
        with(&format!("{slow_tick}\nelection_ticks = 10"), slow).unwrap();
        refused(
            &format!("{slow_tick}\nelection_ticks = 11"),
            slow,
            "raft.election_ticks",
        );
        refused("election_ticks = 100000", "", "raft.election_ticks");
        // Two heartbeats within an election timeout.
        with("heartbeat_ticks = 5", "").unwrap();
        refused("heartbeat_ticks = 6", "", "raft.election_ticks");
        // Deadlines looked at once a tick.
        with("request_timeout_ms = 50", "").unwrap();
        refused("request_timeout_ms = 49", "", "raft.request_timeout_ms");
        with("request_timeout_ms = 600000", "").unwrap();
        refused("request_timeout_ms = 600001", "", "raft.request_timeout_ms");
        refused(
            "request_timeout_ms = 9223372036854775807",
            "",
            "raft.request_timeout_ms",
        );
        // raft-rs's slots per peer, and the peer frame.
        let inflight = crate::raft::transport::PEER_QUEUE;
        with(&format!("max_inflight_msgs = {inflight}"), "").unwrap();
        let past = format!("max_inflight_msgs = {}", inflight + 1);
        refused(&past, "", "raft.max_inflight_msgs");
        with(&format!("max_size_per_msg = {MAX_SIZE_PER_MSG}"), "").unwrap();
        let past = format!("max_size_per_msg = {}", MAX_SIZE_PER_MSG + 1);
        refused(&past, "", "raft.max_size_per_msg");

        // The fence's reach.
        let far = "fence_ahead_ms = 60000\nrenew_before_ms = 59000";
        with("", far).unwrap();
        let too_far = "fence_ahead_ms = 60001\nrenew_before_ms = 59001";
        refused("", too_far, "snowflake.fence_ahead_ms");
        let a_day = "fence_ahead_ms = 86400000\nmax_ahead_of_cluster_ms = 0";
        refused("", a_day, "snowflake.fence_ahead_ms");
        // Renewals looked at once a tick (50 ms here).
        with("", "fence_ahead_ms = 2000\nrenew_before_ms = 100").unwrap();
        let between_ticks = "fence_ahead_ms = 2000\nrenew_before_ms = 99";
        refused("", between_ticks, "snowflake.renew_before_ms");
        let tick_5s = "tick_ms = 5000\nrequest_timeout_ms = 5000";
        refused(tick_5s, "", "snowflake.renew_before_ms");
        // Renewals every 1,950 ms are heard while news, every 2,050 ms not
        // (which only matters with the check on).
        with("", "fence_ahead_ms = 4000\nrenew_before_ms = 2100").unwrap();
        let rare = "fence_ahead_ms = 4000\nrenew_before_ms = 2000";
        refused("", rare, "snowflake.renew_before_ms");
        with("", &format!("{rare}\nmax_ahead_of_cluster_ms = 0")).unwrap();
        // Clock steps.
        with("", &format!("max_rollback_ms = {MAX_ROLLBACK_MS}")).unwrap();
        let past = format!("max_rollback_ms = {}", i64::MAX);
        refused("", &past, "snowflake.max_rollback_ms");
        with(
            "",
            &format!("trust_forward_step_ms = {MAX_TRUST_FORWARD_STEP_MS}"),
        )
        .unwrap();
        let past = format!("trust_forward_step_ms = {}", MAX_TRUST_FORWARD_STEP_MS + 1);
        refused("", &past, "snowflake.trust_forward_step_ms");
    }

    /// The embedded single node given another listen address is named at
    /// it, so that members it adds later can dial it; not when peers are
    /// given too; binding every address, at the new port only.
    #[test]
    fn a_lone_node_is_named_at_its_new_listen_address() {
        let with = |listen: &str, peers: Option<&str>| {
            let o = Overrides {
                listen: Some(listen.into()),
                peers: peers.map(Into::into),
                ..Default::default()
            };
            let cfg = Config::load(None, &o).unwrap();
            cfg.peers[0].addr.clone()
        };
        assert_eq!(with("127.0.0.1:7100", None), "127.0.0.1:7100");
        assert_eq!(with("10.0.0.5:7000", None), "10.0.0.5:7000");
        assert_eq!(with("0.0.0.0:7100", None), "127.0.0.1:7100");
        assert_eq!(with("[::]:7100", None), "127.0.0.1:7100");
        assert_eq!(with("127.0.0.1:7100", Some("1=node1:7001")), "node1:7001");
    }

    /// Each peer can get a worker id.
    #[test]
    fn worker_bits_name_a_worker_id_for_every_peer() {
        let three = |worker_bits: u32| {
            let peers = (1..=3)
                .map(|i| format!("[[peers]]\nid = {i}\naddr = \"127.0.0.1:700{i}\"\n"))
                .collect::<String>();
            let text =
                EMBEDDED_SINGLE.replace("[[peers]]\nid = 1\naddr = \"127.0.0.1:7000\"\n", &peers);
            let layout = format!(
                "[snowflake]\ntime_bits = 41\nworker_bits = {worker_bits}\nsequence_bits = {}\n\
                 max_count = 1000",
                22 - worker_bits
            );
            Config::parse("t", &format!("{text}\n{layout}\n")).and_then(|mut c| c.validate())
        };
        three(2).unwrap();
        let err = three(1).unwrap_err().to_string();
        assert_eq!(
            err,
            "snowflake.worker_bits: 1 bits name 2 worker ids, fewer than the 3 peers"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let base = EMBEDDED_SINGLE;
        let bad = base.replace("step_min = 1000", "step_min = 0");
        let err = Config::parse("t", &bad)
            .and_then(|mut c| c.validate())
            .unwrap_err();
        assert!(
            err.to_string().starts_with("namespaces[0].step_min:"),
            "{err}"
        );

        let err = Config::load(
            None,
            &Overrides {
                node_id: Some(7),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("node.id:"), "{err}");

        let err = Config::load(
            None,
            &Overrides {
                peers: Some("1=127.0.0.1:1,x".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("peers:"), "{err}");
        for empty in ["", " ", ","] {
            let err = Config::load(
                None,
                &Overrides {
                    peers: Some(empty.into()),
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(
                err.to_string().starts_with("peers: given but empty"),
                "{err}"
            );
        }

        let bad = format!("{base}\n[snowflake]\ntime_bits = 42\n");
        let err = Config::parse("t", &bad)
            .and_then(|mut c| c.validate())
            .unwrap_err();
        assert!(err.to_string().starts_with("snowflake:"), "{err}");

        let bad =
            format!("{base}\n[snowflake]\nepoch_ms = 1\ntime_bits = 31\nsequence_bits = 22\n");
        let err = Config::parse("t", &bad)
            .and_then(|mut c| c.validate())
            .unwrap_err();
        assert!(err.to_string().contains("ran out"), "{err}");

        // 16 IDs per ms: the default 100,000 a call would take 6,250 ms of
        // stamps, past any fence; 16,000 fit in 1,000 ms.
        let few_per_ms = |max_count: u32| {
            let text = format!(
                "{base}\n[snowflake]\nworker_bits = 18\nsequence_bits = 4\nmax_count = {max_count}\n"
            );
            Config::parse("t", &text).and_then(|mut c| c.validate())
        };
        let err = few_per_ms(100_000).unwrap_err().to_string();
        assert!(
            err.starts_with("snowflake.max_count: 100000 IDs in one call take 6250 ms")
                && err.contains("at most 16000"),
            "{err}"
        );
        assert!(few_per_ms(16_000).is_ok());
        assert!(few_per_ms(16_001).is_err());

        let err = Config::parse("t", &format!("{base}\nbogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
