//! A rolling restart under load (DESIGN: "rolling restart of all nodes
//! under load: no failed call through the client, no hole"): each node in
//! turn stopped gracefully (SIGTERM: a leader trims, then hands leadership
//! over) and started again, while callers keep calling through the client,
//! coalesced on streams and one RPC per call, in a segmented and a dense
//! namespace. A stopping node ends the call streams its clients keep open,
//! so it stops without waiting out the server's drain timeout.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{check_history, Cluster, Load, Op};

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

/// Waits until every load made 100 more calls.
async fn progress(loads: &[(&str, &str, Load)]) {
    for (_, _, load) in loads {
        load.progress(100, Duration::from_secs(20)).await;
    }
}

/// Runs the restart under load; every call completed, by namespace (ops
/// name their key without it). Panics if any call failed.
async fn rolling_restart_under_load() -> Vec<(&'static str, Vec<Op>)> {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let unary = c.unary_client();
    let loads = [
        (
            "coalesced",
            "conv",
            Load::start(Arc::new(c.client()), "conv", 20, 8),
        ),
        ("unary", "conv", Load::start(Arc::new(unary), "conv", 20, 4)),
        (
            "dense",
            "inbox",
            Load::start(Arc::new(c.client()), "inbox", 10, 4),
        ),
    ];
    progress(&loads).await;
    for id in [leader, leader % 3 + 1, (leader + 1) % 3 + 1] {
        c.terminate(id);
        progress(&loads).await;
        // Down a while, as a restarting container is: the others queue
        // messages for it meanwhile.
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.spawn(id);
        c.wait_status(id, Duration::from_secs(20), "caught up", |s| {
            s.leader_id != 0 && s.applied_index > 0
        })
        .await;
        progress(&loads).await;
    }
    // Clients keep their call streams open; a stopping node ends them, so
    // its server does not wait out its drain timeout for them.
    for id in 1..=3 {
        assert!(
            !c.log(id).contains("did not stop in time"),
            "node {id} waited for its clients' streams to close"
        );
    }
    let mut by_namespace: Vec<(&'static str, Vec<Op>)> = vec![("conv", vec![]), ("inbox", vec![])];
    for (name, namespace, load) in loads {
        let (ops, errors) = load.finish().await;
        assert!(
            errors.is_empty(),
            "{} {name} calls failed, the first: {:?}",
            errors.len(),
            errors.first()
        );
        let into = by_namespace
            .iter_mut()
            .find(|(n, _)| *n == namespace)
            .expect("listed");
        into.1.extend(ops);
    }
    by_namespace
}

/// No call fails, I1 and I2 hold over every number handed out, and no key
/// has a hole: the trims hand every segment's unused rest back before
/// leadership moves, and no election nobody asked for follows a restart
/// (it did while a restarted follower was sent the heartbeats queued for it
/// while it was down, see `transport::drop_stale`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_fails_no_call_and_opens_no_hole() {
    for (namespace, ops) in rolling_restart_under_load().await {
        let checked = check_history(&ops);
        let mut by_key: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for op in &ops {
            by_key.entry(&op.key).or_default().push((op.first, op.last));
        }
        for (key, ranges) in &mut by_key {
            ranges.sort_unstable();
            let mut next = 1;
            for &(first, last) in ranges.iter() {
                assert_eq!(
                    first,
                    next,
                    "{namespace}/{key}: a hole from {next} to {}",
                    first - 1
                );
                next = last + 1;
            }
        }
        println!(
            "rolling restart: {namespace}: {checked} numbers over {} keys, no hole",
            by_key.len()
        );
    }
}
