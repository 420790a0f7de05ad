//! The client's RPC spacing (`ClientOptions::rpc_spacing`) holds a call
//! queued behind a slow RPC for the spacing, not until that RPC answers.
//!
//! Three real nodes in lease mode: with both followers stopped, a call on a
//! cold key waits for a ceiling that cannot commit, while a key already in
//! the leader's memory is still answered under the lease. A call on the warm
//! key made right after the cold one (inside the spacing, so it queues) must
//! be answered while the cold one is still waiting.

mod common;

use std::time::Duration;

use common::Cluster;

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2\nread_mode = \"lease\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_queued_behind_a_slow_rpc_goes_out_after_the_spacing() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    assert_eq!(client.next("conv", "warm", 1).await.unwrap().first, 1);
    // Recent rounds: the lease is fresh when the followers stop.
    for _ in 0..5 {
        client.next("conv", "warm", 1).await.unwrap();
    }

    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    for &f in &followers {
        c.pause(f).await;
    }
    // `join!` polls the cold call first, and `next` sends (or queues) before
    // its first await: the cold call's RPC is out when the warm call is
    // made, well inside the 1 ms spacing, so the warm one queues.
    let cold = client.next("conv", "cold", 1);
    let warm = async {
        let answer =
            tokio::time::timeout(Duration::from_millis(150), client.next("conv", "warm", 1)).await;
        for &f in &followers {
            c.resume(f);
        }
        answer
    };
    let (cold, warm) = tokio::join!(cold, warm);

    let warm = warm
        .expect("the warm call waited for the cold one's RPC instead of the spacing")
        .expect("the warm call failed");
    assert_eq!(warm.first, 7, "the warm key continues");
    let cold = cold.expect("the cold call is answered once the followers run again");
    assert_eq!(cold.first, 1);
}
