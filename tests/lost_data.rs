//! A node that lost its data directory and is started again as itself
//! (without `--join`) has forgotten what it acknowledged and whom it voted
//! for. Its vote could elect a node that lacks committed ceilings, and that
//! node would hand out numbers again (I1). Real processes: the peers that
//! knew its old directory refuse it until it is removed and added back as
//! a replacement.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use seqd::client::ClientOptions;
use seqd::pb::{AddNodeRequest, RemoveNodeRequest};

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_back_with_an_empty_directory_is_refused_until_replaced() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let (wiped, lagging) = (followers[0], followers[1]);
    // Every node opens a stream to every other at start, naming its data
    // directory.
    wait_recorded(&c, lagging, wiped).await;

    // Ceilings the lagging node never hears of: committed by the leader and
    // the follower about to lose its data.
    c.kill(lagging);
    let client = c.client_with(ClientOptions {
        overall_timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    });
    let mut top = 0;
    for _ in 0..20 {
        let r = client.next("conv", "lost", 500).await.unwrap();
        assert!(r.first > top);
        top = r.first + u64::from(r.count) - 1;
    }

    // The follower loses its directory and comes back as itself; the leader
    // is gone. With the wiped node's vote, the lagging node would lead,
    // knowing no ceiling for the key.
    c.kill(wiped);
    std::fs::remove_dir_all(c.data_dir(wiped)).unwrap();
    c.kill(leader);
    let before_restart = c.log(lagging).len();
    c.spawn(lagging);
    c.spawn(wiped);
    // The lagging node campaigns once per election timeout and can win only
    // with the wiped node's vote: calls keep failing through eight of its
    // campaigns. (With pre-vote, a campaign it cannot win stays a
    // pre-campaign. Without the check it led within a few and served 1.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.log(lagging)[before_restart..]
        .matches("became pre-candidate")
        .count()
        < 8
    {
        assert!(
            Instant::now() < deadline,
            "the lagging node stopped campaigning"
        );
        if let Ok(r) = client.next("conv", "lost", 1).await {
            panic!(
                "served {} with only the lagging node and the wiped one up; numbers up to {top} \
                 were handed out before",
                r.first
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refusing = c.log(lagging);
    assert!(
        refusing.contains("refusing a peer's messages") && refusing.contains("lost its Raft state"),
        "the lagging node does not say why it refuses node {wiped}"
    );
    assert!(
        c.log(wiped).contains("peer refuses this node's messages"),
        "the wiped node does not report the refusal"
    );
    let refused = common::metric(
        &c.node(lagging).metrics_addr,
        "seqd_raft_peer_streams_refused_total",
    )
    .expect("the lagging node's refusal count");
    assert!(refused >= 1.0, "refusals counted: {refused}");

    // The old leader returns: it knew the wiped node's directory too, so the
    // two serve without it, above every number handed out.
    c.spawn(leader);
    let serving = c.wait_leader(Duration::from_secs(20)).await;
    assert_ne!(serving, wiped);
    let r = client.next("conv", "lost", 1).await.unwrap();
    assert!(r.first > top, "{} after {top}", r.first);
    top = r.first;

    // The way back: removed, started empty with --join, added again.
    replace(&mut c, serving, wiped).await;
    // It now counts: with the lagging node stopped, the leader and the
    // replacement serve.
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let stop = if leader == lagging { serving } else { lagging };
    assert_ne!(stop, wiped);
    c.kill(stop);
    let patient = c.client();
    let r = patient.next("conv", "lost", 1).await.unwrap();
    assert!(r.first > top, "{} after {top}", r.first);
}

/// A node down while another was replaced (removed, then added back with a
/// new directory) catches up by snapshot, so it never applies the removal
/// that would have forgotten the old directory's record: it must take the
/// replacement once the snapshot is in. Four voters, so that the cluster
/// commits the replacement while one is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_a_replacement_takes_it_after_its_snapshot() {
    let mut c = Cluster::start(4, &format!("{RAFT}\ncompact_threshold = 20"));
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let others: Vec<u64> = (1..=4).filter(|&id| id != leader).collect();
    let (absent, replaced) = (others[0], others[1]);
    // The absent node hears the other's directory before it goes.
    wait_recorded(&c, absent, replaced).await;
    c.kill(absent);

    let first = data_ids_recorded(&c.log(absent), replaced)[0].clone();
    replace(&mut c, leader, replaced).await;
    // The replacement's directory bound (the original's may or may not have
    // been bound before it was removed).
    c.wait_log(
        leader,
        Duration::from_secs(20),
        |log| {
            data_ids_bound(log, replaced)
                .last()
                .is_some_and(|id| *id != first)
        },
        |_| "the replacement is never bound".into(),
    )
    .await;
    let current = data_ids_bound(&c.log(leader), replaced).pop().unwrap();
    // Entries enough that the absent node can only catch up by snapshot.
    let client = c.client();
    for i in 0..200 {
        client.next("conv", &format!("k{i}"), 1).await.unwrap();
    }
    c.wait_status(leader, Duration::from_secs(30), "log compacted", |s| {
        s.compacted_index > 100
    })
    .await;

    c.spawn(absent);
    c.wait_status(absent, Duration::from_secs(30), "snapshot installed", |s| {
        s.snapshots_installed >= 1
    })
    .await;
    // It knew the replaced node's first directory; it takes the one the
    // cluster bound to the replacement (admitting its streams, which it
    // refused while it held the old one).
    c.wait_log(
        absent,
        Duration::from_secs(20),
        |log| data_ids_recorded(log, replaced).contains(&current),
        |log| {
            format!(
                "still holds node {replaced}'s old directory: recorded {:?}, bound {current}",
                data_ids_recorded(log, replaced)
            )
        },
    )
    .await;
    assert!(c.log(absent).contains("installed snapshot"));
}

/// A node down while a member was replaced never saw the replacement's
/// directory. When the replacement then loses its disk and comes back as
/// itself, that node must still refuse it: the leader bound the
/// replacement's directory through the log, and the node applied the
/// binding as it caught up. (Its own first sight would take the new
/// directory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_never_saw_a_directory_refuses_another_by_its_binding() {
    let mut c = Cluster::start(4, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let others: Vec<u64> = (1..=4).filter(|&id| id != leader).collect();
    let (absent, replaced) = (others[0], others[1]);
    wait_bound(&c, leader, replaced, 1).await;
    c.kill(absent);

    replace(&mut c, leader, replaced).await;
    wait_bound(&c, leader, replaced, 2).await;
    let bound = data_ids_bound(&c.log(leader), replaced)[1].clone();
    c.spawn(absent);
    c.wait_rejoined(absent, Duration::from_secs(30)).await;
    c.wait_log(
        absent,
        Duration::from_secs(20),
        |log| data_ids_bound(log, replaced).contains(&bound),
        |_| format!("never applied {bound}"),
    )
    .await;

    // The replacement loses its disk and starts as itself. (Raft-rs stops
    // it at the leader's first heartbeat, whose commit index its empty log
    // cannot have; it opens its streams before that.)
    c.kill(replaced);
    std::fs::remove_dir_all(c.data_dir(replaced)).unwrap();
    c.spawn(replaced);
    let refusal =
        format!("node {replaced} is known here with another data directory (data id {bound},");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.log(absent).contains(&refusal) {
        // Started again (same directory, same id) if it stopped before its
        // stream to the absent node went out: raft-rs panics at the
        // leader's first heartbeat, and the process then exits.
        if c.wait_exit(replaced, Duration::from_millis(1))
            .await
            .is_some()
        {
            c.spawn(replaced);
        }
        if Instant::now() >= deadline {
            c.dump_logs();
            panic!(
                "node {absent} did not refuse node {replaced}'s new directory by the binding \
                 {bound}; it recorded {:?}",
                data_ids_recorded(&c.log(absent), replaced)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two nodes' directories swapped (volumes mixed up): each node refuses
/// to start on the other's directory, naming both ids, before it talks to
/// any peer; on its own directory it starts and serves again, its numbers
/// above what was handed out before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_refuses_another_nodes_directory() {
    let mut c = Cluster::start(3, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let before = client.next("conv", "k", 1).await.unwrap().first;
    c.kill(1);
    c.kill(2);
    let (one, two) = (c.data_dir(1), c.data_dir(2));
    let two_str = two.to_str().unwrap().to_string();
    let one_str = one.to_str().unwrap().to_string();
    for (id, other, dir) in [(1, 2, &two_str), (2, 1, &one_str)] {
        c.spawn_with(id, &["--data-dir", dir]);
        let status = c
            .wait_exit(id, Duration::from_secs(20))
            .await
            .expect("the node stops");
        assert!(!status.success());
        let log = c.log(id);
        let expected = format!("belongs to node {other}, and this node is configured as node {id}");
        assert!(log.contains(&expected), "{log}");
    }
    c.spawn(1);
    c.spawn(2);
    c.wait_leader(Duration::from_secs(20)).await;
    let after = client.next("conv", "k", 1).await.unwrap().first;
    assert!(after > before, "{after} after {before}");
}

/// Waits until node `on` has applied `count` distinct bindings of
/// `node`'s data directory.
async fn wait_bound(c: &Cluster, on: u64, node: u64, count: usize) {
    c.wait_log(
        on,
        Duration::from_secs(20),
        |log| data_ids_bound(log, node).len() >= count,
        |log| {
            format!(
                "applied {:?} as node {node}'s bindings, not {count}",
                data_ids_bound(log, node)
            )
        },
    )
    .await;
}

/// The distinct data ids `log` says were bound to `node`, in order.
fn data_ids_bound(log: &str, node: u64) -> Vec<String> {
    logged_data_ids(log, "a member's data directory bound", node)
}

/// Replaces node `id` as an operator would after it lost its disk: removed
/// through the leader `via`, stopped, wiped, started empty with `--join`,
/// added as a learner, then promoted once caught up.
async fn replace(c: &mut Cluster, via: u64, id: u64) {
    let mut admin = c.admin(via).await;
    admin.remove_node(RemoveNodeRequest { id }).await.unwrap();
    c.kill(id);
    std::fs::remove_dir_all(c.data_dir(id)).unwrap();
    c.spawn_with(id, &["--join"]);
    let addr = c.node(id).addr.clone();
    for voter in [false, true] {
        let request = AddNodeRequest {
            id,
            addr: addr.clone(),
            voter,
        };
        // Through whoever leads by then: three tests run at once on two
        // cores, and leadership may move.
        // A promotion is refused until the leader counts the learner as
        // caught up: that is waited out, not counted as a try.
        let mut tries = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = admin.add_node(request.clone()).await {
            if e.message().contains("answer now") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            tries += 1;
            assert!(tries < 5, "add node {id} (voter {voter}): {e}");
            let leader = c.wait_leader(Duration::from_secs(20)).await;
            admin = c.admin(leader).await;
        }
        c.wait_rejoined(id, Duration::from_secs(30)).await;
    }
}

/// Waits until node `on` has recorded `node`'s data directory.
async fn wait_recorded(c: &Cluster, on: u64, node: u64) {
    c.wait_log(
        on,
        Duration::from_secs(20),
        |log| !data_ids_recorded(log, node).is_empty(),
        |_| format!("never recorded node {node}'s data directory"),
    )
    .await;
}

/// The distinct data ids `log` says were recorded for `node`, in order.
fn data_ids_recorded(log: &str, node: u64) -> Vec<String> {
    logged_data_ids(log, "recorded a peer's data directory", node)
}

/// The distinct data ids of `node` in `log`'s lines that say `what`.
fn logged_data_ids(log: &str, what: &str, node: u64) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for line in log.lines() {
        if !line.contains(what) || !line.contains(&format!("peer_id={node} ")) {
            continue;
        }
        let id = line
            .split("data_id=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    seen
}
