//! Idle keys leave the leader's memory through the log: a key released
//! before its leader is killed continues at the next number, with no hole,
//! where an unreleased key skips the rest of its segment.

mod common;

use std::time::Duration;

use common::Cluster;

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_key_survives_a_leader_crash_without_a_hole() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();

    // "idle" forgets keys after 1 s; "conv" only after the default 10 min.
    let a = client.next("idle", "room:1", 5).await.unwrap();
    let b = client.next("conv", "room:2", 5).await.unwrap();
    assert_eq!((a.first, b.first), (1, 1));

    // The idle key is released (its ceiling lowered to 5 through the log)
    // and leaves memory; the other stays.
    let s = c
        .wait_status(leader, Duration::from_secs(15), "idle key released", |s| {
            s.active_keys == 1
        })
        .await;
    assert_eq!(s.epoch, a.epoch, "a release opens no hole");
    assert_eq!(client.current("idle", "room:1").await.unwrap(), 5);
    let metrics = common::http_get(&c.node(leader).metrics_addr, "/metrics").expect("metrics");
    let released = metrics
        .lines()
        .find_map(|l| l.strip_prefix("seqd_idle_key_releases_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(released, Some(1.0), "one key released:\n{metrics}");

    c.kill(leader);
    let next = c.wait_other_leader(leader, Duration::from_secs(20)).await;
    assert_ne!(next, leader);

    let a2 = client.next("idle", "room:1", 1).await.unwrap();
    assert_eq!(a2.first, 6, "the released key continues where it stood");
    let b2 = client.next("conv", "room:2", 1).await.unwrap();
    assert!(
        b2.first > 6,
        "the key still in memory skips the rest of its segment ({})",
        b2.first
    );
    assert!(b2.epoch > b.epoch, "a crash announces possible holes");
}
