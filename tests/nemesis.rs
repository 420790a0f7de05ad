//! Nemesis against real processes: three `seqd` nodes, each in its own
//! network namespace with its own address, under concurrent sequence
//! (segmented and dense) and ID load, while random faults hit the cluster
//! one at a time: SIGKILL and restart, SIGSTOP/SIGCONT past the election
//! timeout, a node cut off from everyone (its switch port down), one link
//! between two nodes cut (each still reaches the third and the clients) or
//! lost in one direction, and clock shifts back and forward. Every completed
//! call is checked for I1 and I2, every ID for uniqueness (I5).
//!
//! Short by default (CI); `SEQD_NEMESIS_SECS=600` for a long run and
//! `SEQD_NEMESIS_SEED=n` to repeat a fault schedule. Needs root (network
//! namespaces).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_dense, check_history, Cluster, IdLoad, Load};
use seqd::pb::InjectFaultRequest;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A fault's duration, drawn from [lo, hi) ms.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

async fn shift_clock(c: &Cluster, id: u64, clock_offset_ms: i64) {
    let mut admin = c.admin(id).await;
    let req = InjectFaultRequest {
        clock_offset_ms,
        isolate: false,
        sync_delay_ms: 0,
    };
    // Each fault starts once every node is back, so the node answers.
    tokio::time::timeout(Duration::from_secs(2), admin.inject_fault(req))
        .await
        .unwrap_or_else(|_| panic!("node {id} did not answer InjectFault within 2 s"))
        .unwrap_or_else(|e| panic!("node {id} refused InjectFault: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_keeps_every_invariant() {
    nemesis("read_index").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_keeps_every_invariant_with_leader_leases() {
    nemesis("lease").await;
}

async fn nemesis(read_mode: &str) {
    let secs = env_u64("SEQD_NEMESIS_SECS").unwrap_or(20);
    let seed = env_u64("SEQD_NEMESIS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    eprintln!(
        "nemesis ({read_mode}): seed {seed}, {secs} s (repeat with SEQD_NEMESIS_SEED={seed})"
    );
    let mut rng = Rng(seed);

    let raft = format!(
        "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2\nread_mode = \"{read_mode}\""
    );
    let mut c = Cluster::start_netns(3, &raft);
    c.wait_leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        c.wait_status(id, Duration::from_secs(20), "issuing IDs", |s| s.ids_active)
            .await;
    }
    let client = Arc::new(c.client());
    let seg = Load::start(client.clone(), "conv", 20, 6);
    let dense = Load::start(client.clone(), "inbox", 4, 2);
    let ids = IdLoad::start(c.addrs(), 20);

    const KINDS: [&str; 6] = [
        "kill+restart",
        "pause",
        "isolate",
        "link cut",
        "one-way loss",
        "clock shift",
    ];
    let mut faults = [0u32; KINDS.len()];
    // Every kind once in each run of six, in an order the seed shuffles,
    // and the run goes on until each has happened: drawn at random, a
    // 20 s run missed a kind in about a third of runs.
    let mut order: Vec<usize> = (0..KINDS.len()).collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut round = 0;
    while Instant::now() < deadline || faults.contains(&0) {
        if round % KINDS.len() == 0 {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let kind = order[round % KINDS.len()];
        round += 1;
        let node = 1 + rng.below(3);
        let other = 1 + (node + rng.below(2)) % 3;
        let hold = rng.millis(800, 2_500);
        let net = c.net.as_ref().expect("nodes in network namespaces");
        match kind {
            0 => {
                c.kill(node);
                tokio::time::sleep(hold).await;
                c.spawn(node);
            }
            1 => {
                c.pause(node).await;
                tokio::time::sleep(hold).await;
                c.resume(node);
            }
            2 => {
                net.isolate(node);
                tokio::time::sleep(hold).await;
                net.rejoin(node);
            }
            3 => {
                net.drop_link(node, other);
                net.drop_link(other, node);
                tokio::time::sleep(hold).await;
                net.heal();
            }
            4 => {
                net.drop_link(node, other);
                tokio::time::sleep(hold).await;
                net.heal();
            }
            _ => {
                let shift = rng.below(6_000) as i64 - 3_000;
                shift_clock(&c, node, shift).await;
                tokio::time::sleep(hold).await;
                shift_clock(&c, node, 0).await;
            }
        }
        faults[kind] += 1;
        // Next fault only once the victims are back and clients are served,
        // so a majority is always there to be found.
        c.wait_rejoined(node, Duration::from_secs(30)).await;
        c.wait_rejoined(other, Duration::from_secs(30)).await;
        seg.progress(100, Duration::from_secs(30)).await;
    }

    let (mut ops, mut errors) = seg.finish().await;
    let (dense_ops, dense_errors) = dense.finish().await;
    // Every call succeeded (asserted below): no hole in a dense key.
    let dense_numbers = dense_errors.is_empty().then(|| check_dense(&dense_ops));
    errors.extend(dense_errors);
    ops.extend(dense_ops.into_iter().map(|mut o| {
        o.key = format!("inbox/{}", o.key);
        o
    }));
    let (ids, duplicates) = ids.finish().await;
    let numbers = check_history(&ops);
    let injected: Vec<String> = KINDS
        .iter()
        .zip(faults)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    eprintln!(
        "nemesis ({read_mode}): faults: {}; {} calls, {numbers} numbers (dense, consecutive: {dense_numbers:?}) and {} ids checked, {} client errors; violations: I1/I2 0 (checked above), I5 {duplicates}",
        injected.join(", "),
        ops.len(),
        ids.len(),
        errors.len(),
    );
    assert_eq!(duplicates, 0, "duplicate Snowflake IDs");
    assert!(
        errors.is_empty(),
        "calls failed through the client: {errors:?}"
    );
}

/// The namespace faults are real: a leader whose port is down loses its
/// leadership to the others, the client moves on, and it rejoins after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_by_the_network_is_replaced() {
    let c = Cluster::start_netns(3, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    let old = c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let before = client.next("conv", "k", 1).await.expect("served before");
    let net = c.net.as_ref().expect("namespaces");

    net.isolate(old);
    let new = c.wait_other_leader(old, Duration::from_secs(10)).await;
    assert_ne!(new, old);
    assert!(
        c.status(old).await.is_none(),
        "node {old} still answers the test process through a port that is down"
    );
    let during = client
        .next("conv", "k", 1)
        .await
        .expect("served by the new leader");
    assert!(during.first > before.first, "I2 across the partition");

    net.rejoin(old);
    c.wait_rejoined(old, Duration::from_secs(20)).await;
    let after = client
        .next("conv", "k", 1)
        .await
        .expect("served after healing");
    assert!(after.first > during.first);
}
