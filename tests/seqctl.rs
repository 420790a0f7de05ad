//! The operator CLI against a live cluster: status shows the leader;
//! leadership moves and membership changes while clients keep getting
//! numbers, with I1 and I2 holding throughout.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{check_history, Cluster, Load};
use seqd::pb::{InjectFaultRequest, NextRequest, StatusRequest};

fn seqctl(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .arg("--endpoints")
        .arg(c.addrs().join(","))
        .args(args)
        .output()
        .expect("run seqctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn leader_of(json: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(json).expect("status --json is JSON");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "Leader")
        .map(|n| n["id"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seqctl_moves_leadership_and_changes_membership_under_load() {
    let mut c = Cluster::start(3, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let client = Arc::new(c.client());
    let load = Load::start(client.clone(), "conv", 20, 8);

    let (ok, table, err) = seqctl(&c, &["status"]);
    assert!(ok, "{err}");
    assert!(table.contains("Leader"), "{table}");
    assert_eq!(
        table.lines().count(),
        4,
        "a header and one row per node:\n{table}"
    );
    let (ok, json, _) = seqctl(&c, &["status", "--json"]);
    assert!(ok);
    assert_eq!(leader_of(&json), vec![leader]);

    // Requests raft-rs would take and do harm with are refused, naming why,
    // and change nothing: a transfer to a non-voter or to the leader itself
    // (which raft-rs ignores, while the trim stopped serving for a second),
    // a voter added again as a learner (a demotion) or as a voter.
    let follower = leader % 3 + 1;
    let follower_addr = c.node(follower).addr.clone();
    let refused: [(&[&str], &str); 4] = [
        (&["transfer-leader", "--to", "9"], "node 9 is not a voter"),
        (
            &["transfer-leader", "--to", &leader.to_string()],
            "leads already",
        ),
        (
            &[
                "add-node",
                "--id",
                &follower.to_string(),
                "--addr",
                &follower_addr,
            ],
            "would demote it",
        ),
        (
            &[
                "add-node",
                "--id",
                &follower.to_string(),
                "--addr",
                &follower_addr,
                "--voter",
            ],
            "already a voter",
        ),
    ];
    for (args, why) in refused {
        let (ok, out, err) = seqctl(&c, args);
        assert!(!ok, "{args:?} was accepted: {out}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let (_, json, _) = seqctl(&c, &["status", "--json"]);
    assert_eq!(leader_of(&json), vec![leader]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["voters"].as_array().map(Vec::len), Some(3), "{json}");
    }

    // Move leadership to a chosen node; intervals too long for the clock
    // to reach are never.
    let target = leader % 3 + 1;
    let never = u64::MAX.to_string();
    let (ok, _, err) = seqctl(
        &c,
        &[
            "transfer-leader",
            "--to",
            &target.to_string(),
            "--progress-secs",
            &never,
            "--timeout-secs",
            &never,
        ],
    );
    assert!(ok, "{err}");
    c.wait_status(target, Duration::from_secs(20), "leading", |s| s.serving)
        .await;
    let (_, json, _) = seqctl(&c, &["status", "--json"]);
    assert_eq!(leader_of(&json), vec![target]);

    // Replace a follower: remove it, wipe it, re-add it as learner, promote.
    let gone = (1..=3).find(|id| *id != target).unwrap();
    let (ok, out, err) = seqctl(&c, &["remove-node", "--id", &gone.to_string()]);
    assert!(ok, "{err}");
    assert!(
        !out.contains(&format!("{gone},")) || !out.contains("voters=["),
        "{out}"
    );
    c.kill(gone);
    std::fs::remove_dir_all(c.data_dir(gone)).unwrap();
    c.spawn_with(gone, &["--join"]);
    // Added back by host name, as in a compose network (`node3:7003`).
    let port = c.node(gone).addr.rsplit(':').next().unwrap().to_string();
    let addr = format!("localhost:{port}");
    // Refused, naming the field: no port; and one the transport would
    // read as another address (`localhost:80`).
    let with_path = format!("localhost/x:{port}");
    for bad in ["localhost", with_path.as_str()] {
        let (ok, _, err) = seqctl(&c, &["add-node", "--id", &gone.to_string(), "--addr", bad]);
        assert!(
            !ok && err.contains(&format!("addr: {bad:?} is not a host:port address")),
            "{err}"
        );
    }
    let (ok, out, err) = seqctl(
        &c,
        &["add-node", "--id", &gone.to_string(), "--addr", &addr],
    );
    assert!(ok, "{err}");
    assert!(out.contains(&format!("learners=[{gone}]")), "{out}");
    c.wait_status(gone, Duration::from_secs(30), "caught up", |s| {
        s.applied_index > 0 && s.leader_id != 0
    })
    .await;
    // A learner is promoted at the address it was added with.
    let (ok, _, err) = seqctl(
        &c,
        &[
            "add-node",
            "--id",
            &gone.to_string(),
            "--addr",
            "127.0.0.1:1",
            "--voter",
        ],
    );
    assert!(!ok && err.contains("is a learner at"), "{err}");
    // Refused until the leader counts the learner as caught up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let out = loop {
        let (ok, out, err) = seqctl(
            &c,
            &[
                "add-node",
                "--id",
                &gone.to_string(),
                "--addr",
                &addr,
                "--voter",
                "--json",
            ],
        );
        if ok {
            break out;
        }
        assert!(
            err.contains("answer now") && std::time::Instant::now() < deadline,
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["voters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_u64() == Some(gone)),
        "{out}"
    );

    // The rebuilt cluster keeps serving.
    load.progress(300, Duration::from_secs(30)).await;
    let (ops, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "calls failed through the client: {errors:?}"
    );
    let numbers = check_history(&ops);
    eprintln!("seqctl: {} calls, {numbers} numbers checked", ops.len());

    // A node restarted with its file still naming the replaced node at its
    // old address (127.0.0.1:PORT) takes the one add-node recorded.
    let other = (1..=3).find(|id| *id != target && *id != gone).unwrap();
    c.kill(other);
    c.spawn(other);
    c.wait_log(
        other,
        Duration::from_secs(20),
        |log| log.contains("using the recorded one") && log.contains(&addr),
        |_| format!("node {other} did not take {gone}'s recorded address {addr}"),
    )
    .await;
    c.wait_rejoined(other, Duration::from_secs(20)).await;
    c.client().next("conv", "after-restart", 1).await.unwrap();

    // Led by the replacement, the others' leader hints name the address
    // add-node recorded, not the one their files say.
    let (ok, _, err) = seqctl(&c, &["transfer-leader", "--to", &gone.to_string()]);
    assert!(ok, "{err}");
    c.wait_status(gone, Duration::from_secs(20), "leading", |s| s.serving)
        .await;
    for id in [target, other] {
        // A follower that has not heard from the new leader yet has no
        // hint to give: ask until it has one.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let err = c
                .sequencer(id)
                .await
                .next(seqd::pb::NextRequest {
                    namespace: "conv".into(),
                    key: "hint".into(),
                    count: 1,
                    request_id: String::new(),
                })
                .await
                .expect_err("a follower does not answer Next");
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
            let hint = err
                .metadata()
                .get("seqd-leader-addr")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if let Some(hint) = hint {
                assert_eq!(hint, addr, "node {id}'s hint: {err:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} gives no hint: {err:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[test]
fn seqctl_errors_are_one_line_and_non_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .args(["--endpoints", "127.0.0.1:1", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("seqctl: "), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .args(["--endpoints", "127.0.0.1:1", "remove-node", "--id", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no leader"), "{err}");

    // Each endpoint that did not answer is named, a malformed one as such;
    // spaces around the commas are not part of them.
    let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .args([
            "--endpoints",
            "127.0.0.1:1, bad host:2 ,",
            "remove-node",
            "--id",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no leader among 127.0.0.1:1,bad host:2;")
            && err.contains("127.0.0.1:1: ")
            && err.contains("bad host:2: bad endpoint"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .args(["--endpoints", " , ", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "seqctl: --endpoints: no endpoint given\n"
    );
}

/// Membership changes after which the voters that answer could not commit
/// (not even the change's undo) are refused, naming who answers, and change
/// nothing: a voter added to a lone node at an address nobody serves, and a
/// live follower removed while the other is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_that_would_leave_no_quorum_are_refused() {
    const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let (ok, _, err) = seqctl(
        &c,
        &["add-node", "--id", "2", "--addr", "127.0.0.1:1", "--voter"],
    );
    assert!(!ok, "a voter nobody serves was added to a lone node");
    assert!(err.contains("only [1] answer now"), "{err}");
    let (ok, _, err) = seqctl(&c, &["remove-node", "--id", "9"]);
    assert!(!ok && err.contains("node 9 is not a member"), "{err}");
    let (ok, _, err) = seqctl(&c, &["add-node", "--id", "2", "--addr", "127.0.0.1:1"]);
    assert!(ok, "a learner changes no quorum: {err}");
    let (ok, _, err) = seqctl(
        &c,
        &["add-node", "--id", "2", "--addr", "127.0.0.1:1", "--voter"],
    );
    assert!(!ok && err.contains("only [1] answer now"), "{err}");
    c.client().next("conv", "k", 1).await.unwrap();
    drop(c);

    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    c.kill(followers[0]);
    // Once the leader no longer counts the dead one as answering (an
    // election timeout without its answers), it must refuse.
    let status = c
        .wait_status(
            leader,
            Duration::from_secs(20),
            "the dead follower dropped",
            |s| s.role == "Leader" && !s.answering.contains(&followers[0]),
        )
        .await;
    assert!(status.answering.contains(&leader), "{status:?}");
    let (ok, _, err) = seqctl(&c, &["remove-node", "--id", &followers[1].to_string()]);
    assert!(!ok, "a live voter was removed while the other was down");
    let refusal = format!("removing node {} would leave voters", followers[1]);
    assert!(err.contains(&refusal), "{err}");
    // The dead one may go: the two that answer stay a majority of two.
    let (ok, _, err) = seqctl(&c, &["remove-node", "--id", &followers[0].to_string()]);
    assert!(ok, "{err}");
    c.client().next("conv", "k", 1).await.unwrap();
}

/// Gives `id` `keys` keys held in memory, each called once (1,000 a
/// `NextBatch`), and waits until a handover finds them all idle.
async fn hold_keys(c: &Cluster, id: u64, prefix: &str, keys: usize) {
    let per_call = 1_000;
    let mut api = c.sequencer(id).await;
    for call in 0..keys / per_call {
        let keys = (0..per_call).map(|i| format!("{prefix}-{:06}", call * per_call + i));
        common::call_each_once(&mut api, keys).await;
    }
    // A handover releases the keys unused for a second and trims the rest:
    // idleness is time on the node's clock, with nothing else to wait on.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
}

async fn slow_every_fsync(c: &Cluster, delay_ms: u32) {
    for id in 1..=3 {
        c.admin(id)
            .await
            .inject_fault(InjectFaultRequest {
                clock_offset_ms: 0,
                isolate: false,
                sync_delay_ms: delay_ms,
            })
            .await
            .unwrap();
    }
}

/// A handover long enough to watch: the leader holds more keys than one
/// part of a trim (10,000), so it first releases them, 1,000 an entry, and
/// every fsync takes 150 ms, so that takes at least six seconds.
/// `transfer-leader` waits for all of it, however long (its fixed two
/// minutes were shorter than a handover of ten million keys), prints how
/// far the handover got, and can be told to stop waiting, which leaves the
/// handover going on. Status shows the phases in order, and the leader
/// serves while it releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_leader_follows_a_long_handover_and_can_stop_waiting() {
    const KEYS: usize = 40_000;
    let c = Cluster::start(3, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    let first = c.wait_leader(Duration::from_secs(20)).await;
    hold_keys(&c, first, "a", KEYS).await;
    slow_every_fsync(&c, 150).await;

    // Told to wait one second only: seqctl says so and fails, and the
    // handover goes on to move leadership.
    let second = first % 3 + 1;
    let (ok, out, err) = seqctl(
        &c,
        &[
            "transfer-leader",
            "--to",
            &second.to_string(),
            "--timeout-secs",
            "1",
        ],
    );
    assert!(!ok, "seqctl did not stop waiting: {out}");
    assert!(
        err.contains("stopped waiting after 1 s; the handover goes on"),
        "{err}"
    );
    let mid = c.status(first).await.expect("status");
    assert!(
        mid.handover.is_some() && mid.role == "Leader",
        "the handover did not go on after seqctl stopped waiting: {mid:?}"
    );
    c.wait_status(second, Duration::from_secs(120), "leading", |s| s.serving)
        .await;
    c.wait_status(first, Duration::from_secs(10), "handover ended", |s| {
        s.handover.is_none()
    })
    .await;

    // Waiting for all of it, with progress every second, while this test
    // samples the leader's status.
    slow_every_fsync(&c, 0).await;
    hold_keys(&c, second, "b", KEYS).await;
    slow_every_fsync(&c, 150).await;
    let endpoints = c.addrs().join(",");
    let third = (1..=3).find(|id| *id != first && *id != second).unwrap();
    let seqctl_run = std::thread::spawn(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_seqctl"))
            .args(["--endpoints", &endpoints, "transfer-leader"])
            .args(["--to", &third.to_string(), "--progress-secs", "1"])
            .output()
            .expect("run seqctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    });
    let mut samples = Vec::new();
    let mut served_while_releasing = false;
    let mut admin = c.admin(second).await;
    while !seqctl_run.is_finished() {
        let s = admin.status(StatusRequest {}).await.unwrap().into_inner();
        if let Some(h) = s.handover {
            if h.phase == "releasing" && !served_while_releasing {
                c.sequencer(second)
                    .await
                    .next(NextRequest {
                        namespace: "conv".into(),
                        key: "during-release".into(),
                        count: 1,
                        request_id: String::new(),
                    })
                    .await
                    .expect("the leader serves while it releases");
                served_while_releasing = true;
                wait_metric(&c, second, "seqd_handover_phase", 1.0).await;
                // `seqctl status` shows it too, in its table and its JSON.
                let (ok, table, err) = seqctl(&c, &["status"]);
                assert!(ok, "{err}");
                assert!(
                    table.contains(&format!("node {second}: handover ")),
                    "{table}"
                );
                let (ok, json, err) = seqctl(&c, &["status", "--json"]);
                assert!(ok, "{err}");
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                let node = v["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["id"] == second)
                    .unwrap();
                assert_eq!(node["handover"]["keys_at_start"], KEYS, "{json}");
            }
            samples.push(h);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out, err) = seqctl_run.join().unwrap();
    eprintln!("seqctl transfer-leader:\n{err}{out}");

    assert!(ok, "{err}");
    assert!(out.contains("leadership moved away from"), "{out}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("releasing idle keys (serving)"))
        .collect();
    assert!(
        lines.len() >= 2,
        "one progress line a second over six seconds of releases: {err}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains("released, ") && l.ends_with(&format!("of {KEYS} keys looked at"))),
        "{err}"
    );

    assert!(
        served_while_releasing,
        "no sample while releasing: {samples:?}"
    );
    let order = |phase: &str| match phase {
        "releasing" => 0,
        "trimming" => 1,
        "transferring" => 2,
        other => panic!("unknown phase {other:?}"),
    };
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            order(&a.phase) <= order(&b.phase) && a.elapsed_ms <= b.elapsed_ms,
            "phases out of order: {a:?} then {b:?}"
        );
        assert_eq!(a.keys_at_start, b.keys_at_start);
        assert!(a.keys_looked_at <= b.keys_looked_at, "{a:?} then {b:?}");
        assert!(a.keys_released <= b.keys_released, "{a:?} then {b:?}");
        if a.phase == "trimming" && b.phase == "trimming" {
            assert!(a.trim_keys_left >= b.trim_keys_left, "{a:?} then {b:?}");
        }
    }
    let releasing: Vec<_> = samples.iter().filter(|h| h.phase == "releasing").collect();
    assert!(
        releasing.first().unwrap().keys_released < releasing.last().unwrap().keys_released,
        "the release did not move on between samples: {releasing:?}"
    );
    c.wait_status(third, Duration::from_secs(30), "leading", |s| s.serving)
        .await;
    c.wait_status(second, Duration::from_secs(10), "handover ended", |s| {
        s.handover.is_none()
    })
    .await;
    wait_metric(&c, second, "seqd_handover_phase", 0.0).await;
}

/// Waits for node `id`'s gauge `name` to read `value` (gauges are set on
/// the node's next tick).
async fn wait_metric(c: &Cluster, id: u64, name: &str, value: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let read = common::metric(&c.node(id).metrics_addr, name);
        if read == Some(value) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {id}: {name} is {read:?}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
