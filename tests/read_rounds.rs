//! A leader's read rounds go to one follower (`raft.read_round_peers =
//! "majority"`, the default). Killing either follower of three real nodes
//! under load fails no call and elects no one: when the follower the rounds
//! went to dies, the pending round is sent to everyone again and the other
//! follower's answer completes it; pausing either (SIGSTOP: connections
//! stay open, nothing answers) does the same. Every number handed out is
//! checked for I1 and I2.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_history, longest_stall, Cluster, Load};

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_either_follower_under_load_fails_no_call() {
    each_follower_in_turn_under_load(Disruption::Kill).await;
}

/// A follower that stops answering without closing its connections (a
/// SIGSTOPped process, a hung host) costs the rounds that went to it a
/// resend, not the calls: pausing either follower of three under load
/// fails no call, keeps the leader and stalls no call for a second. Every
/// number is checked for I1 and I2, also after the follower resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pausing_either_follower_under_load_fails_no_call() {
    each_follower_in_turn_under_load(Disruption::Pause).await;
}

/// What befalls each follower in turn.
#[derive(Debug, Clone, Copy)]
enum Disruption {
    /// SIGKILL, then started again.
    Kill,
    /// SIGSTOP, then SIGCONT.
    Pause,
}

/// Three nodes under load; each follower in turn is disrupted and comes
/// back. No call may fail or stall for a second, the leader keeps its
/// leadership, a round waiting on the disrupted follower is sent to
/// everyone again (one of the two took the follower the rounds went to),
/// and every number is checked for I1 and I2.
async fn each_follower_in_turn_under_load(how: Disruption) {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = Arc::new(c.client());
    let load = Load::start(client.clone(), "conv", 40, 12);
    load.progress(1000, Duration::from_secs(30)).await;

    let started = Instant::now();
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    for &f in &followers {
        // The leader and the other follower serve on their own meanwhile.
        match how {
            Disruption::Kill => {
                c.kill(f);
                load.progress(1000, Duration::from_secs(20)).await;
                c.spawn(f);
            }
            Disruption::Pause => {
                c.pause(f).await;
                // Calls for at least 3.5 s: past the leader's keepalive to
                // the paused follower (a PING after 1 s idle, unanswered
                // for 2 s, drops its connection).
                let paused = Instant::now();
                while paused.elapsed() < Duration::from_millis(3_500) {
                    load.progress(1_000, Duration::from_secs(20)).await;
                }
                c.resume(f);
            }
        }
        c.wait_rejoined(f, Duration::from_secs(30)).await;
        load.progress(1000, Duration::from_secs(20)).await;
    }

    let (ops, errors) = load.finish().await;
    let stall = longest_stall(&ops, started);
    let checked = check_history(&ops);
    eprintln!("{how:?}: {checked} calls checked, longest stall {stall:?}");
    if !errors.is_empty() {
        c.dump_logs();
    }
    assert!(
        errors.is_empty(),
        "{how:?}: calls failed: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert_eq!(
        c.wait_leader(Duration::from_secs(5)).await,
        leader,
        "{how:?}: a follower's trouble must not cost the leader its leadership"
    );
    let value = |name: &str| common::metric(&c.node(leader).metrics_addr, name).unwrap_or(0.0);
    let rounds = value("seqd_raft_read_index_rounds_total");
    let resends = value("seqd_raft_read_index_resends_total");
    eprintln!("{how:?}: {rounds} read rounds, {resends} sent to everyone again");
    assert!(rounds > 0.0, "no read round counted");
    assert!(
        resends >= 1.0,
        "{how:?}: no round was re-sent although the chosen follower stopped answering"
    );
    assert!(
        stall < Duration::from_secs(1),
        "{how:?}: calls stalled for {stall:?} while a follower was out"
    );
}

/// Shrinks three nodes to a lone voter and grows them back, under load.
/// A lone voter answers without read rounds (no other node can be elected
/// without its vote); growing back to two voters must bring the rounds back
/// at once, or a deposed leader could answer: every number is checked for
/// I1 and I2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_voter_answers_without_rounds_and_grows_back_under_load() {
    use seqd::pb::{AddNodeRequest, RemoveNodeRequest};

    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = Arc::new(c.client());
    let load = Load::start(client.clone(), "conv", 40, 12);
    load.progress(500, Duration::from_secs(30)).await;

    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let mut admin = c.admin(leader).await;
    for &f in &followers {
        admin
            .remove_node(RemoveNodeRequest { id: f })
            .await
            .unwrap_or_else(|e| panic!("remove node {f}: {e}"));
        c.kill(f);
        std::fs::remove_dir_all(c.data_dir(f)).unwrap();
    }
    let metrics_addr = c.node(leader).metrics_addr.clone();
    let rounds =
        || common::metric(&metrics_addr, "seqd_raft_read_index_rounds_total").unwrap_or(0.0);
    // Calls already waiting on a round when the second removal applied
    // may still start one; after that, none.
    load.progress(500, Duration::from_secs(20)).await;
    let before = rounds();
    load.progress(2000, Duration::from_secs(20)).await;
    let alone = rounds() - before;
    assert_eq!(alone, 0.0, "a lone voter sent {alone} read rounds");

    for &f in &followers {
        c.spawn_with(f, &["--join"]);
        let addr = c.node(f).addr.clone();
        admin
            .add_node(AddNodeRequest {
                id: f,
                addr,
                voter: false,
            })
            .await
            .unwrap_or_else(|e| panic!("add learner {f}: {e}"));
        c.wait_status(f, Duration::from_secs(30), "caught up", |s| {
            s.applied_index > 0 && s.leader_id != 0
        })
        .await;
        c.promote(leader, f).await;
        let grown = rounds();
        load.progress(500, Duration::from_secs(20)).await;
        assert!(
            rounds() > grown,
            "no read round after node {f} became a voter"
        );
    }

    let (ops, errors) = load.finish().await;
    let checked = check_history(&ops);
    eprintln!("{checked} calls checked");
    if !errors.is_empty() {
        c.dump_logs();
    }
    assert!(
        errors.is_empty(),
        "calls failed: {:?}",
        &errors[..errors.len().min(5)]
    );
}

/// Each node configures its own timing. A follower restarted with a shorter
/// election timeout (a rolling change) may vote sooner after a heartbeat
/// than the leader's own settings say; the lease a leader takes follows the
/// shortest vote promise its voters name on their streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lease_follows_the_shortest_vote_promise() {
    let mut c = Cluster::start(3, &format!("{RAFT}\nread_mode = \"lease\""));
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    // 0.8 of (10 - 2) ticks of 50 ms, then of (6 - 2).
    wait_lease(&c, 0.32).await;
    let f = (1..=3).find(|&id| id != leader).unwrap();
    c.kill(f);
    let original = c.rewrite_config(f, |text| {
        text.replace("election_ticks = 10", "election_ticks = 6")
    });
    assert!(original.contains("election_ticks = 10"), "{original}");
    c.spawn(f);
    wait_lease(&c, 0.16).await;
    c.client().next("conv", "k", 1).await.unwrap();
}

/// Waits until the node leading reports a lease of `secs`.
async fn wait_lease(c: &Cluster, secs: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = c.wait_leader(Duration::from_secs(20)).await;
        let lease = common::metric(&c.node(leader).metrics_addr, "seqd_lease_seconds");
        if lease.is_some_and(|l| (l - secs).abs() < 1e-6) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leader {leader}'s lease {lease:?}, want {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
