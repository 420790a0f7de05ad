//! A follower stopped long enough for the log to be compacted past it
//! catches up by snapshot, and can then lead with the right state
//! (ceilings, and what dense calls with a request id were given).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{check_history, Cluster, Load};
use seqd::pb::admin_client::AdminClient;
use seqd::pb::{BatchItem, NextBatchRequest, TransferLeaderRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_by_snapshot() {
    let mut c = Cluster::start(
        3,
        "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2\ncompact_threshold = 20",
    );
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let lagger = leader % 3 + 1;
    c.kill(lagger);
    // A dense call with a request id whose record the lagger can only get
    // from the snapshot.
    let mut api = c.sequencer(leader).await;
    let retried = NextBatchRequest {
        namespace: "inbox".into(),
        items: vec![BatchItem {
            key: "before-snapshot".into(),
            count: 3,
        }],
        request_id: "answered-before-the-snapshot".into(),
    };
    let first = api.next_batch(retried.clone()).await.unwrap().into_inner();

    let client = Arc::new(c.client());
    // Many keys: every first call per key is a refill, i.e. a log entry.
    let load = Load::start(client.clone(), "conv", 2_000, 8);
    let leader_status = c
        .wait_status(leader, Duration::from_secs(60), "log compacted", |s| {
            s.compacted_index > 100
        })
        .await;
    c.spawn(lagger);
    let caught = c
        .wait_status(lagger, Duration::from_secs(30), "snapshot installed", |s| {
            s.snapshots_installed >= 1 && s.applied_index >= leader_status.commit_index
        })
        .await;
    assert!(caught.compacted_index > 0);

    // Hand leadership to the node that was rebuilt from the snapshot; its
    // numbers must continue above everything handed out before.
    let mut admin = AdminClient::connect(format!("http://{}", c.node(leader).addr))
        .await
        .unwrap();
    admin
        .transfer_leader(TransferLeaderRequest { to: lagger })
        .await
        .unwrap();
    c.wait_status(lagger, Duration::from_secs(20), "leading", |s| s.serving)
        .await;
    let mut api = c.sequencer(lagger).await;
    let again = api.next_batch(retried).await.unwrap().into_inner();
    assert_eq!(
        again.ranges, first.ranges,
        "the leader rebuilt from a snapshot gave a retried dense call other numbers"
    );
    // Calls served by the rebuilt leader.
    load.progress(300, Duration::from_secs(30)).await;
    let (ops, errors) = load.finish().await;
    assert!(errors.is_empty(), "{errors:?}");
    let numbers = check_history(&ops);
    eprintln!(
        "snapshot: {} calls, {numbers} numbers checked; follower caught up at applied {}",
        ops.len(),
        caught.applied_index
    );
}
