//! Three real nodes under concurrent load; the leader is SIGKILLed mid-load
//! and later restarted. Every number handed out is checked for I1 and I2.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_dense, check_history, longest_stall, Cluster, Load};

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_mid_load_keeps_every_number_unique_and_ordered() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = Arc::new(c.client());
    let seg = Load::start(client.clone(), "conv", 40, 12);
    let dense = Load::start(client.clone(), "inbox", 8, 4);

    seg.progress(500, Duration::from_secs(30)).await;
    dense.progress(50, Duration::from_secs(30)).await;
    let killed_at = Instant::now();
    c.kill(leader);
    let new_leader = c.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    // The survivors serve both namespaces before the old leader returns.
    seg.progress(500, Duration::from_secs(30)).await;
    dense.progress(50, Duration::from_secs(30)).await;
    c.spawn(leader);
    c.wait_rejoined(leader, Duration::from_secs(30)).await;
    seg.progress(200, Duration::from_secs(30)).await;

    let (mut ops, mut errors) = seg.finish().await;
    let (dense_ops, dense_errors) = dense.finish().await;
    // Every call succeeded (asserted below): no hole in a dense key.
    let dense_numbers = dense_errors.is_empty().then(|| check_dense(&dense_ops));
    errors.extend(dense_errors);
    let stall = longest_stall(&ops, killed_at);
    let dense_count = dense_ops.len();
    ops.extend(dense_ops.into_iter().map(|mut o| {
        o.key = format!("inbox/{}", o.key);
        o
    }));
    let after_kill = ops.iter().filter(|o| o.invoked > killed_at).count();
    let numbers = check_history(&ops);
    eprintln!(
        "failover: {} calls ({} dense), {numbers} numbers checked (dense, consecutive: {dense_numbers:?}), {after_kill} calls after the kill, longest stall {stall:?}",
        ops.len(),
        dense_count
    );
    assert!(
        errors.is_empty(),
        "calls failed through the client: {errors:?}"
    );
    assert!(
        after_kill > 100,
        "the cluster must keep serving after the kill"
    );
    assert!(stall < Duration::from_secs(5), "stalled for {stall:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_leader_transfer_loses_no_call_and_opens_no_hole() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let mut last = 0;
    for _ in 0..20 {
        last = client.next("conv", "rolling", 1).await.unwrap().first;
    }
    // Rolling restart: each node in turn, leader included.
    for id in [leader, leader % 3 + 1, (leader + 1) % 3 + 1] {
        c.terminate(id);
        for _ in 0..5 {
            let r = client.next("conv", "rolling", 1).await.unwrap();
            assert_eq!(
                r.first,
                last + 1,
                "no hole across a graceful stop of node {id}"
            );
            last = r.first;
        }
        c.spawn(id);
        c.wait_status(id, Duration::from_secs(20), "caught up", |s| {
            s.leader_id != 0 && s.applied_index > 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_leader_is_deposed_and_hands_out_nothing_stale() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = Arc::new(c.client());
    let load = Load::start(client.clone(), "conv", 10, 12);
    load.progress(300, Duration::from_secs(30)).await;
    // Until the others have elected a new leader and served through it,
    // while the old one still believes it leads and has calls queued.
    c.pause(leader).await;
    let paused_at = Instant::now();
    c.wait_other_leader(leader, Duration::from_secs(30)).await;
    load.progress(300, Duration::from_secs(30)).await;
    c.resume(leader);
    c.wait_rejoined(leader, Duration::from_secs(30)).await;
    load.progress(300, Duration::from_secs(30)).await;
    let (ops, errors) = load.finish().await;
    let numbers = check_history(&ops);
    let stall = longest_stall(&ops, paused_at);
    eprintln!(
        "pause: {} calls, {numbers} numbers checked, longest stall {stall:?}",
        ops.len()
    );
    assert!(
        errors.is_empty(),
        "calls failed through the client: {errors:?}"
    );
    assert!(stall < Duration::from_secs(5), "stalled for {stall:?}");
}

/// What a dense batch with a request id got is in the log: when its
/// leader dies (its answer lost, say) and the batch is sent again to the
/// new leader, the retry gets the same ranges, not new ones that would leave
/// a hole in a gap-free namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dense_request_id_outlives_its_leader() {
    use seqd::pb::{BatchItem, NextBatchRequest};

    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let batch = |items: &[(&str, u32)], request_id: &str| NextBatchRequest {
        namespace: "inbox".into(),
        items: items
            .iter()
            .map(|(key, count)| BatchItem {
                key: key.to_string(),
                count: *count,
            })
            .collect(),
        request_id: request_id.into(),
    };
    let retried = batch(&[("r1", 2), ("r2", 1)], "lost-answer");
    let mut api = c.sequencer(leader).await;
    let first = api.next_batch(retried.clone()).await.unwrap().into_inner();

    c.kill(leader);
    let new_leader = c.wait_other_leader(leader, Duration::from_secs(20)).await;
    let mut api = c.sequencer(new_leader).await;
    // It serves: it has applied its start-of-term entry, and so every raise
    // committed before it.
    let again = api.next_batch(retried.clone()).await.unwrap().into_inner();
    assert_eq!(again.ranges, first.ranges, "the retry got other ranges");
    let next = api
        .next_batch(batch(&[("r1", 1)], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next.ranges[0].first,
        first.ranges[0].first + 2,
        "a dense key went on with a hole"
    );

    // Every node restarted: the records come back from their disks.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let mut api = c.sequencer(leader).await;
    let after_restart = api.next_batch(retried).await.unwrap().into_inner();
    assert_eq!(
        after_restart.ranges, first.ranges,
        "after a restart of every node the retry got other ranges"
    );
}
