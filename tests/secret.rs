//! A cluster configured with a shared secret (`node.secret`) takes Raft
//! streams and Admin changes only from callers that send it: a forged Raft
//! message (which raft-rs would take as fatal) or snapshot is refused
//! before it reaches the node; every Admin change without it is refused
//! while `Status` stays open; seqctl with `--secret` works; a node started with another secret
//! is refused by its peers, says so in its log, and the others serve on.
//! Real processes.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Cluster;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use seqd::pb::peer_client::PeerClient;
use seqd::pb::{
    AddNodeRequest, InjectFaultRequest, RaftFrame, RemoveNodeRequest, SnapshotChunk,
    TransferLeaderRequest,
};
use seqd::service::SECRET_HEADER;
use tonic::Code;

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";
const SECRET: &str = "s3cret-for-the-test-cluster";

fn seqctl(c: &Cluster, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .arg("--endpoints")
        .arg(c.addrs().join(","))
        .args(args)
        .env_remove("SEQD_SECRET")
        .output()
        .expect("run seqctl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A heartbeat from a node that is no member, for a term far ahead and a
/// commit index past any log: raft-rs stops a node that takes it.
fn forged_heartbeat(to: u64) -> RaftFrame {
    let mut msg = Message::default();
    msg.set_msg_type(MessageType::MsgHeartbeat);
    msg.from = 7;
    msg.to = to;
    msg.term = 1_000_000;
    msg.commit = u64::MAX;
    RaftFrame {
        from: 7,
        message: msg.write_to_bytes().unwrap(),
        sent_ms: 0,
    }
}

/// A peer stream of one `frame`, named as node 7 (any data id), with
/// `secret` if given.
fn as_node_7<T>(
    frame: T,
    secret: Option<&str>,
) -> tonic::Request<tokio_stream::Iter<std::vec::IntoIter<T>>> {
    let mut request = tonic::Request::new(tokio_stream::iter(vec![frame]));
    request.metadata_mut().insert("seqd-node-id", 7u64.into());
    request.metadata_mut().insert("seqd-data-id", 7u64.into());
    if let Some(s) = secret {
        request
            .metadata_mut()
            .insert(SECRET_HEADER, s.parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_secret_only_callers_that_send_it_reach_raft_and_admin() {
    let mut c = Cluster::start(3, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let before = client.next("conv", "k", 1).await.unwrap().first;
    // The secret set on every node (all at once: a node with one refuses
    // the streams of a node without).
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn_with(id, &["--secret", SECRET]);
    }
    let leader = c.wait_leader(Duration::from_secs(30)).await;
    let after = client.next("conv", "k", 1).await.unwrap().first;
    assert!(after > before, "{after} after {before}");

    // A forged Raft message without the secret never reaches raft-rs.
    let addr = format!("http://{}", c.node(leader).addr);
    for secret in [None, Some("a-wrong-secret-of-length")] {
        let mut peer = PeerClient::connect(addr.clone()).await.unwrap();
        let request = as_node_7(forged_heartbeat(leader), secret);
        let refused = peer.raft(request).await.expect_err("refused");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains(SECRET_HEADER), "{refused:?}");
    }
    let next = client.next("conv", "k", 1).await.unwrap().first;
    assert!(next > after);
    assert_eq!(c.wait_leader(Duration::from_secs(5)).await, leader);

    // Nor does a forged snapshot.
    let mut peer = PeerClient::connect(addr.clone()).await.unwrap();
    let chunk = SnapshotChunk {
        from: 7,
        total: 3,
        data: vec![1, 2, 3],
    };
    let refused = peer
        .snapshot(as_node_7(chunk, None))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // Admin changes need it; Status does not.
    let mut admin = c.admin(leader).await;
    let refusals = [
        admin
            .transfer_leader(TransferLeaderRequest { to: 0 })
            .await
            .map(drop),
        admin
            .add_node(AddNodeRequest {
                id: 9,
                addr: "127.0.0.1:9".into(),
                voter: false,
            })
            .await
            .map(drop),
        admin
            .remove_node(RemoveNodeRequest { id: 3 })
            .await
            .map(drop),
        admin
            .inject_fault(InjectFaultRequest {
                isolate: true,
                ..InjectFaultRequest::default()
            })
            .await
            .map(drop),
    ];
    for refused in refusals {
        let refused = refused.expect_err("refused");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    let status = c.status(leader).await.expect("Status stays open");
    assert_eq!(status.voters.len(), 3, "no member added or removed");
    let (ok, text) = seqctl(&c, &["remove-node", "--id", "3"]);
    assert!(!ok && text.contains(SECRET_HEADER), "{text}");
    let (ok, text) = seqctl(&c, &["--secret", SECRET, "transfer-leader"]);
    assert!(ok, "{text}");
    let moved = c.wait_other_leader(leader, Duration::from_secs(20)).await;

    // A node started with another secret is refused by its peers (and
    // refuses theirs), says why, and the two others serve on.
    let odd = (1..=3).find(|&id| id != moved).unwrap();
    c.kill(odd);
    c.spawn_with(odd, &["--secret", "another-secret-entirely"]);
    c.wait_log(
        odd,
        Duration::from_secs(20),
        |log| log.contains("peer refuses this node's messages") && log.contains(SECRET_HEADER),
        |log| format!("no refusal logged:\n{log}"),
    )
    .await;
    let last = client.next("conv", "k", 1).await.unwrap().first;
    assert!(last > next);
    let status = c.status(odd).await.expect("the odd node answers Status");
    assert_ne!(status.role, "Leader");
}
