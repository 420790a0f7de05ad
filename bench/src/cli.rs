//! Command line: which targets, which workloads, and the load shape.

use std::fmt;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Default location of the release seqd that `scripts/compare.sh` builds.
pub const DEFAULT_SEQD_BIN: &str = "/var/cache/seqd-target-release/release/seqd";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "seqcompare",
    version,
    about = "Starts seqd (1 and 3 nodes), Redis (no persistence, fsync always) and etcd on \
             loopback, drives each with the same callers and keys, and compares \
             throughput and latency",
    after_help = "Every target runs in a fresh temporary directory on free loopback ports and \
                  is stopped at the end (also on Ctrl-C). Results go to the terminal and, as \
                  JSON, to --json."
)]
pub struct Args {
    /// seqd binary to run.
    #[arg(long, env = "SEQD_BIN", default_value = DEFAULT_SEQD_BIN)]
    pub seqd_bin: PathBuf,
    /// redis-server binary to run.
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: PathBuf,
    /// etcd binary to run (Debian's etcd-server, 3.4).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// Targets to run, comma-separated. seqd without its client
    /// (`seqd-3node-raw`, what the client's coalescing is worth) is left
    /// out by default to keep the whole comparison inside ten minutes on a
    /// fresh machine.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "seqd-1node,seqd-3node,seqd-3node-lease,redis-none,redis-always,etcd"
    )]
    pub targets: Vec<TargetKind>,
    /// Workloads to run, comma-separated; a workload a target cannot run is
    /// reported as n/a.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "next,next-count,batch,ids"
    )]
    pub workloads: Vec<Workload>,
    /// Concurrent callers per target (each one call in flight at a time).
    #[arg(long, default_value_t = 32)]
    pub callers: usize,
    /// Further closed-loop runs at these caller counts, comma-separated, for
    /// the --peak-workloads on the --peak-targets: each target's peak
    /// throughput and where it reached it, against the others at the same
    /// concurrency (DESIGN.md's "peak throughput above Redis INCR at the
    /// same client concurrency"; --callers alone is one point, below some
    /// targets' peaks). Together with the --callers rows they make the
    /// peak table.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub peak_callers: Vec<usize>,
    /// Targets of the peak runs (those also in --targets). etcd (flat from
    /// 32 callers) and seqd without its client are left out by default to
    /// keep the whole comparison inside ten minutes on a fresh machine.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "seqd-1node,seqd-3node,seqd-3node-lease,redis-none,redis-always"
    )]
    pub peak_targets: Vec<TargetKind>,
    /// Workloads of the peak runs (those also in --workloads).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "next")]
    pub peak_workloads: Vec<Workload>,
    /// Measured seconds of each peak run (after --warmup-seconds; the
    /// README's table took 3).
    #[arg(long, default_value_t = 2)]
    pub peak_seconds: u64,
    /// No peak runs: the --callers table alone.
    #[arg(long)]
    pub no_peak: bool,
    /// Measured seconds per (target, workload). The defaults keep a whole
    /// run (21 rows and 10 peak runs) near three and a quarter minutes, so
    /// that a fresh machine installs, builds (five minutes on the slower
    /// of the project's 2-core VMs) and compares within ten. The README's
    /// table was taken with `--seconds 5 --open-loop-seconds 3 --peak-seconds 3` and
    /// `seqd-3node-raw` among the targets (the defaults until session 34);
    /// `--seconds 10 --warmup-seconds 2 --open-loop-seconds 5` is the
    /// longer run of 2026-11-25's figures in bench/results/HISTORY.md.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Warm-up seconds before each measurement, excluded from the figures.
    #[arg(long, default_value_t = 1)]
    pub warmup_seconds: u64,
    /// Runs every target and workload this many times, in turn (each
    /// round starts every target afresh; every other round takes the
    /// targets in reverse order), and reports for each row the
    /// round with the median calls/s, the median of the per-round ratios
    /// and every round's calls/s: on a shared machine a single round's
    /// figures move with the minute they ran in.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Measure a call count instead of --seconds: each closed-loop run
    /// ends once this many calls started after the warm-up have completed
    /// (failed ones included), the same count for every target, and its
    /// throughput is those calls over the time they took. The open-loop
    /// run after it still lasts --open-loop-seconds.
    #[arg(long)]
    pub calls: Option<u64>,
    /// After each closed-loop run, an open-loop run at this fraction of the
    /// calls/s that run reached (0: none): latency at a load the target keeps
    /// up with, as DESIGN.md's "p99 at half of peak" asks.
    #[arg(long, default_value_t = 0.5)]
    pub open_loop_fraction: f64,
    /// Open-loop runs at this many calls/s for every row instead of a
    /// fraction of its peak: the same offered load for every target (or
    /// for two seqd builds compared against each other).
    #[arg(long)]
    pub open_loop_rate: Option<f64>,
    /// Callers of the open-loop runs: how many calls may be in flight at
    /// once. More than --callers, so that the harness does not queue calls
    /// a real frontend would have sent (the arrival rate sets the load).
    #[arg(long, default_value_t = 256)]
    pub open_loop_callers: usize,
    /// Measured seconds of each open-loop run (after a 1 s warm-up).
    #[arg(long, default_value_t = 2)]
    pub open_loop_seconds: u64,
    /// Do not call every key once before measuring a target (then the keys
    /// first touched inside a measured window charge their one-time cost,
    /// for seqd a ceiling raised through the log, to that window).
    #[arg(long)]
    pub no_prime: bool,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// How callers pick keys.
    #[arg(long, value_enum, default_value = "uniform")]
    pub dist: Dist,
    /// Zipf exponent for --dist zipf (key of rank r drawn with weight 1/r^s).
    #[arg(long, default_value_t = 1.0)]
    pub zipf_s: f64,
    /// Numbers per call for next-count and ids.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Keys per call for batch.
    #[arg(long, default_value_t = 50)]
    pub fanout: usize,
    /// seqd namespace the sequence workloads use ("conv": segmented, "inbox":
    /// dense; both are in the generated config).
    #[arg(long, default_value = "conv")]
    pub namespace: String,
    /// Connections per target node shared by the callers (gRPC channels,
    /// Redis multiplexed connections, etcd clients); caller i uses i mod N.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// seqd client library: coalesced RPCs on the wire at once per
    /// namespace (`ClientOptions::max_in_flight`; 0: one RPC per call).
    #[arg(long, default_value_t = seqd::client::ClientOptions::default().max_in_flight)]
    pub max_in_flight: usize,
    /// seqd client library: microseconds the newest coalesced RPC must
    /// have been out before another may start (`ClientOptions::rpc_spacing`;
    /// 0: whenever a slot is free).
    #[arg(long, default_value_t = seqd::client::ClientOptions::default().rpc_spacing.as_micros() as u64)]
    pub rpc_spacing_us: u64,

    /// Queued calls that go at once, whatever the spacing
    /// (`ClientOptions::rpc_fill`; 0: the spacing alone decides).
    #[arg(long, default_value_t = seqd::client::ClientOptions::default().rpc_fill)]
    pub rpc_fill: usize,
    /// Worker threads of the harness's runtime, which runs every target's
    /// callers and client library (the same for every target). Default:
    /// one per CPU. The targets share the machine: fewer workers leave
    /// their server threads cores of their own, which changes the
    /// closed-loop figures a great deal (README "Performance"), while the
    /// open-loop runs need the harness's CPU to keep their schedule.
    #[arg(long)]
    pub client_threads: Option<usize>,
    /// Seed of the callers' key choices (caller i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    pub json: PathBuf,
    /// Parent directory of the targets' temporary directories (default: the
    /// system temp dir). Must be a real disk for the fsync figures to mean
    /// anything, not tmpfs.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Seconds to wait for a target to start and elect a leader.
    #[arg(long, default_value_t = 60)]
    pub start_timeout: u64,
}

impl Args {
    /// The caller counts of the peak runs (without --callers, which the
    /// main rows measure), ascending; empty with --no-peak.
    pub fn peak_points(&self) -> Vec<usize> {
        if self.no_peak {
            return Vec::new();
        }
        let mut points: Vec<usize> = self
            .peak_callers
            .iter()
            .copied()
            .filter(|&c| c != self.callers)
            .collect();
        points.sort_unstable();
        points.dedup();
        points
    }

    /// Whether `w` gets peak runs (on the --peak-targets).
    pub fn peak_workload(&self, w: Workload) -> bool {
        !self.no_peak && self.peak_workloads.contains(&w) && self.workloads.contains(&w)
    }

    /// Whether `t` gets peak runs.
    pub fn peak_target(&self, t: TargetKind) -> bool {
        !self.no_peak && self.peak_targets.contains(&t)
    }

    /// Whether each row gets an open-loop run after its closed-loop one.
    pub fn open_loop(&self) -> bool {
        self.open_loop_rate.is_some() || self.open_loop_fraction > 0.0
    }

    /// The harness runtime's worker threads (`--client-threads`, or its
    /// default for a machine of `cpus`).
    pub fn client_threads(&self, cpus: usize) -> usize {
        self.client_threads.unwrap_or(cpus.max(1))
    }

    /// Rejects combinations that cannot be run, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.callers == 0 {
            return Err("--callers must be at least 1".into());
        }
        if self.seconds == 0 {
            return Err("--seconds must be at least 1".into());
        }
        if !self.no_peak && self.peak_callers.contains(&0) {
            return Err("--peak-callers must all be at least 1 (or --no-peak)".into());
        }
        if !self.no_peak && self.peak_seconds == 0 {
            return Err("--peak-seconds must be at least 1 (or --no-peak)".into());
        }
        if self.rounds == 0 {
            return Err("--rounds must be at least 1".into());
        }
        if self.calls == Some(0) {
            return Err("--calls must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.open_loop_fraction) {
            return Err("--open-loop-fraction must be between 0 (no open-loop run) and 1".into());
        }
        if self
            .open_loop_rate
            .is_some_and(|r| !(r.is_finite() && r > 0.0))
        {
            return Err("--open-loop-rate must be a positive number of calls per second".into());
        }
        if self.open_loop() && self.open_loop_seconds == 0 {
            return Err(
                "--open-loop-seconds must be at least 1 (or --open-loop-fraction 0)".into(),
            );
        }
        if self.open_loop() && self.open_loop_callers == 0 {
            return Err("--open-loop-callers must be at least 1".into());
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if self.count == 0 {
            return Err("--count must be at least 1".into());
        }
        if self.fanout == 0 || self.fanout as u64 > self.keys {
            return Err(format!(
                "--fanout must be between 1 and --keys ({}): a batch needs distinct keys",
                self.keys
            ));
        }
        if self.fanout > 10_000 {
            return Err("--fanout must be at most 10000 (seqd's NextBatch limit)".into());
        }
        if !(self.zipf_s.is_finite() && self.zipf_s > 0.0) {
            return Err("--zipf-s must be a positive number".into());
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.client_threads == Some(0) {
            return Err("--client-threads must be at least 1".into());
        }
        if self.targets.is_empty() || self.workloads.is_empty() {
            return Err("--targets and --workloads must name at least one each".into());
        }
        Ok(())
    }
}

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// One seqd node (a Raft group of one).
    #[value(name = "seqd-1node")]
    Seqd1,
    /// Three seqd processes forming one Raft group; calls go through seqd's
    /// client library, which coalesces concurrent calls into shared RPCs
    /// (`Next` to the leader, `NextIds` to one node of the client's).
    #[value(name = "seqd-3node")]
    Seqd3,
    /// The same three-node group, every call its own RPC (raw gRPC stubs;
    /// `NextIds` callers spread over every node).
    #[value(name = "seqd-3node-raw")]
    Seqd3Raw,
    /// Three nodes with read_mode = "lease", through the client library.
    #[value(name = "seqd-3node-lease")]
    Seqd3Lease,
    /// redis-server without persistence.
    RedisNone,
    /// redis-server with an append-only file fsync'd on every write.
    RedisAlways,
    /// A single etcd node; a counter is a get + compare-and-swap transaction.
    Etcd,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Seqd1 => "seqd-1node",
            Self::Seqd3 => "seqd-3node",
            Self::Seqd3Raw => "seqd-3node-raw",
            Self::Seqd3Lease => "seqd-3node-lease",
            Self::RedisNone => "redis-none",
            Self::RedisAlways => "redis-always",
            Self::Etcd => "etcd",
        }
    }

    /// What a returned number survives, as stated in the results.
    pub fn durability(self) -> &'static str {
        match self {
            Self::Seqd1 | Self::Seqd3 | Self::Seqd3Raw | Self::Etcd => "raft majority fsync",
            Self::Seqd3Lease => "raft majority fsync (lease reads)",
            Self::RedisNone => "none (memory)",
            Self::RedisAlways => "fsync every write, single node",
        }
    }

    pub fn is_seqd(self) -> bool {
        matches!(
            self,
            Self::Seqd1 | Self::Seqd3 | Self::Seqd3Raw | Self::Seqd3Lease
        )
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One number per call (seqd Next count 1, Redis INCR, etcd +1).
    Next,
    /// --count numbers per call (seqd Next, Redis INCRBY, etcd +count).
    NextCount,
    /// One number for each of --fanout distinct keys per call (seqd
    /// NextBatch: through the client library, whole on the leader's
    /// stream; on seqd-3node-raw one RPC per call; Redis MULTI/EXEC of
    /// INCRs, etcd one multi-key transaction).
    Batch,
    /// --count Snowflake IDs per call (seqd only): through the client
    /// library, coalesced, from one node; on seqd-3node-raw one RPC per
    /// call, the callers spread over every node.
    Ids,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Self::Next => "next",
            Self::NextCount => "next-count",
            Self::Batch => "batch",
            Self::Ids => "ids",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dist {
    Uniform,
    Zipf,
}

/// What one call of a workload does, independent of the target.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// `count` numbers for one key.
    Next { count: u32 },
    /// One number for each of `fanout` distinct keys.
    Batch { fanout: usize },
    /// `count` Snowflake IDs.
    Ids { count: u32 },
}

impl Op {
    pub fn of(workload: Workload, args: &Args) -> Self {
        match workload {
            Workload::Next => Self::Next { count: 1 },
            Workload::NextCount => Self::Next { count: args.count },
            Workload::Batch => Self::Batch {
                fanout: args.fanout,
            },
            Workload::Ids => Self::Ids { count: args.count },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("seqcompare").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn a_call_count_replaces_the_measured_seconds_and_must_be_positive() {
        assert_eq!(parse(&[]).calls, None);
        let counted = parse(&["--calls", "100000"]);
        assert_eq!(counted.calls, Some(100_000));
        assert!(counted.validate().is_ok());
        let err = parse(&["--calls", "0"]).validate().unwrap_err();
        assert!(err.contains("--calls"), "{err}");
    }

    #[test]
    fn the_harness_takes_a_worker_per_cpu_unless_told() {
        let default = parse(&[]);
        assert_eq!(default.client_threads(2), 2);
        assert_eq!(default.client_threads(0), 1);
        let told = parse(&["--client-threads", "3"]);
        assert_eq!(told.client_threads(2), 3);
        let err = parse(&["--client-threads", "0"]).validate().unwrap_err();
        assert!(err.contains("--client-threads"), "{err}");
    }

    #[test]
    fn one_round_unless_told_and_never_none() {
        assert_eq!(parse(&[]).rounds, 1);
        assert_eq!(parse(&["--rounds", "3"]).rounds, 3);
        let err = parse(&["--rounds", "0"]).validate().unwrap_err();
        assert!(err.contains("--rounds"), "{err}");
    }

    #[test]
    fn peak_runs_go_beyond_the_main_callers_for_next_unless_told() {
        let default = parse(&[]);
        assert_eq!(default.peak_points(), [256, 512]);
        assert!(default.peak_workload(Workload::Next));
        assert!(!default.peak_workload(Workload::Batch));
        assert!(default.peak_target(TargetKind::RedisNone));
        assert!(!default.peak_target(TargetKind::Etcd));
        assert!(!default.peak_target(TargetKind::Seqd3Raw));
        // The --callers point is the main rows'; the rest ascending, once.
        let told = parse(&["--callers", "64", "--peak-callers", "256,64,16,256"]);
        assert_eq!(told.peak_points(), [16, 256]);
        // Only workloads that run at all.
        assert!(!parse(&["--workloads", "batch"]).peak_workload(Workload::Next));
        let none = parse(&["--no-peak"]);
        assert!(none.peak_points().is_empty());
        assert!(!none.peak_workload(Workload::Next));
        let err = parse(&["--peak-callers", "128,0"]).validate().unwrap_err();
        assert!(err.contains("--peak-callers"), "{err}");
    }
}
