//! Nemesis against real processes: three `seqd` nodes under concurrent
//! sequence (segmented and dense) and ID load, while random faults hit one
//! node at a time: SIGKILL and restart, SIGSTOP/SIGCONT past the election
//! timeout, network isolation (all Raft traffic dropped), and clock shifts
//! back and forward. Every completed call is checked for I1 and I2, every
//! ID for uniqueness (I5).
//!
//! Short by default (CI); `SEQD_NEMESIS_SECS=600` for a long run and
//! `SEQD_NEMESIS_SEED=n` to repeat a fault schedule.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_history, Cluster, IdLoad, Load};
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

async fn inject(c: &Cluster, id: u64, clock_offset_ms: i64, isolate: bool) {
    let mut admin = c.admin(id).await;
    let req = InjectFaultRequest {
        clock_offset_ms,
        isolate,
    };
    // The node may be restarting; the fault is then moot.
    let _ = tokio::time::timeout(Duration::from_secs(2), admin.inject_fault(req)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_keeps_every_invariant() {
    let secs = env_u64("SEQD_NEMESIS_SECS").unwrap_or(20);
    let seed = env_u64("SEQD_NEMESIS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    eprintln!("nemesis: seed {seed}, {secs} s (repeat with SEQD_NEMESIS_SEED={seed})");
    let mut rng = Rng(seed);

    let mut c = Cluster::start(3, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    c.wait_leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        c.wait_status(id, Duration::from_secs(20), "issuing IDs", |s| s.ids_active)
            .await;
    }
    let client = Arc::new(c.client());
    let seg = Load::start(client.clone(), "conv", 20, 6);
    let dense = Load::start(client.clone(), "inbox", 4, 2);
    let ids = IdLoad::start(c.addrs(), 20);

    let mut faults = [0u32; 4];
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let node = 1 + rng.below(3);
        let hold = rng.millis(800, 2_500);
        let kind = rng.below(4) as usize;
        match kind {
            0 => {
                c.kill(node);
                tokio::time::sleep(hold).await;
                c.spawn(node);
            }
            1 => {
                c.pause(node);
                tokio::time::sleep(hold).await;
                c.resume(node);
            }
            2 => {
                inject(&c, node, 0, true).await;
                tokio::time::sleep(hold).await;
                inject(&c, node, 0, false).await;
            }
            _ => {
                let shift = rng.below(6_000) as i64 - 3_000;
                inject(&c, node, shift, false).await;
                tokio::time::sleep(hold).await;
                inject(&c, node, 0, false).await;
            }
        }
        faults[kind] += 1;
        // Next fault only once the victim is back and clients are served,
        // so a majority is always there to be found.
        c.wait_rejoined(node, Duration::from_secs(30)).await;
        seg.progress(100, Duration::from_secs(30)).await;
    }

    let (mut ops, mut errors) = seg.finish().await;
    let (dense_ops, dense_errors) = dense.finish().await;
    errors.extend(dense_errors);
    ops.extend(dense_ops.into_iter().map(|mut o| {
        o.key = format!("inbox/{}", o.key);
        o
    }));
    let (ids, duplicates) = ids.finish().await;
    let numbers = check_history(&ops);
    eprintln!(
        "nemesis: faults: {} kill+restart, {} pause, {} isolate, {} clock shift; {} calls, {numbers} numbers and {} ids checked, {} client errors; violations: I1/I2 0 (checked above), I5 {duplicates}",
        faults[0],
        faults[1],
        faults[2],
        faults[3],
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
