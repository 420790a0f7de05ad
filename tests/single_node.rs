//! A single real node: answers, survives SIGKILL with higher numbers, and
//! hands over without a hole on SIGTERM.

mod common;

use std::time::Duration;

use common::Cluster;
use seqd::client::ClientOptions;

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_node_serves_and_restarts_higher() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();

    let a = client.next("conv", "alice", 1).await.unwrap();
    assert_eq!((a.first, a.count), (1, 1));
    let b = client.next("conv", "alice", 5).await.unwrap();
    assert_eq!((b.first, b.count), (2, 5));
    let batch = client
        .next_batch("conv", &[("alice", 2), ("bob", 1)])
        .await
        .unwrap();
    assert_eq!(batch.ranges.len(), 2);
    assert_eq!(
        (batch.ranges[0].key.as_str(), batch.ranges[0].first),
        ("alice", 7)
    );
    assert_eq!(
        (batch.ranges[1].key.as_str(), batch.ranges[1].first),
        ("bob", 1)
    );
    assert_eq!(client.current("conv", "alice").await.unwrap(), 8);
    assert_eq!(client.current("conv", "nobody").await.unwrap(), 0);
    // Without the keys in the answer: range i is item i's, on the stream
    // and as the RPC alike.
    let unary = c.client_with(ClientOptions {
        max_in_flight: 0,
        ..ClientOptions::default()
    });
    for (from, over) in [(9, &client), (11, &unary)] {
        let ranges = over
            .next_batch_ranges("conv", &[("alice", 2), ("bob", 3)])
            .await
            .unwrap();
        let bob = if from == 9 { 2 } else { 5 };
        let got: Vec<(u64, u32)> = ranges.ranges.iter().map(|r| (r.first, r.count)).collect();
        assert_eq!(got, [(from, 2), (bob, 3)], "{ranges:?}");
        assert_eq!(ranges.epoch, batch.epoch);
        assert!(!ranges.replayed);
    }

    // A crash skips the unused rest of the segment, never reuses a number,
    // and announces the possible hole with a new epoch.
    c.kill(1);
    c.spawn(1);
    c.wait_leader(Duration::from_secs(20)).await;
    let d = client.next("conv", "alice", 1).await.unwrap();
    assert!(d.first > 8, "after a crash {} must be above 8", d.first);
    assert!(
        d.epoch > a.epoch,
        "epoch {} must change after a crash ({})",
        d.epoch,
        a.epoch
    );
    assert!(client.current("conv", "alice").await.unwrap() >= d.first);

    // A graceful stop trims: the next number follows without a hole and the
    // epoch stays.
    let e = client.next("conv", "alice", 3).await.unwrap();
    c.terminate(1);
    c.spawn(1);
    c.wait_leader(Duration::from_secs(20)).await;
    let f = client.next("conv", "alice", 1).await.unwrap();
    assert_eq!(f.first, e.first + 3, "no hole across a graceful restart");
    assert_eq!(f.epoch, e.epoch, "no new epoch without a hole");
}

/// A dense call whose caller gives up before its raise commits still takes
/// its numbers, a hole in a gap-free namespace that no epoch announces
/// (nothing failed on the node's side): counted, so that it is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dense_call_given_up_before_its_commit_is_counted() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let unanswered = || {
        common::metric(
            &c.node(1).metrics_addr,
            "seqd_dense_grants_unanswered_total",
        )
    };
    assert_eq!(unanswered(), Some(0.0), "exported from the start");
    let c = &c;
    let sync_delay = |ms: u32| async move {
        c.admin(1)
            .await
            .inject_fault(seqd::pb::InjectFaultRequest {
                clock_offset_ms: 0,
                isolate: false,
                sync_delay_ms: ms,
            })
            .await
            .expect("inject fault");
    };
    let next = |timeout: Option<Duration>| {
        let mut req = tonic::Request::new(seqd::pb::NextRequest {
            namespace: "inbox".into(),
            key: "given-up".into(),
            count: 1,
            request_id: String::new(),
        });
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        req
    };
    let mut api = c.sequencer(1).await;
    // Every fsync takes a second: the caller gives up after 200 ms.
    sync_delay(1000).await;
    let err = api
        .next(next(Some(Duration::from_millis(200))))
        .await
        .expect_err("the caller gave up first");
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while unanswered() != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned grant was not counted: {:?}",
            unanswered()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sync_delay(0).await;
    let after = api.next(next(None)).await.expect("next").into_inner();
    assert_eq!(after.first, 2, "number 1 went to the caller that gave up");
    assert_eq!(unanswered(), Some(1.0), "an answered call is not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dense_namespace_has_no_holes_even_across_a_crash() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let mut expect = 1;
    for round in 0..3 {
        for _ in 0..20 {
            let r = client.next("inbox", "user:1", 2).await.unwrap();
            assert_eq!(r.first, expect, "round {round}");
            expect += 2;
        }
        c.kill(1);
        c.spawn(1);
        c.wait_leader(Duration::from_secs(20)).await;
    }
    assert_eq!(client.current("inbox", "user:1").await.unwrap(), expect - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_id_returns_the_same_range() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let a = client.next_with_id("conv", "k", 2, "msg-1").await.unwrap();
    let b = client.next_with_id("conv", "k", 2, "msg-1").await.unwrap();
    assert_eq!((a.first, a.count), (b.first, b.count));
    // The repeat says it is one; the allocations say they are not.
    assert!(!a.replayed && b.replayed, "{a:?} then {b:?}");
    let other = client.next_with_id("conv", "k", 2, "msg-2").await.unwrap();
    assert_eq!(other.first, a.first + 2);
    assert!(!other.replayed, "{other:?}");
    let err = client
        .next_with_id("conv", "k", 3, "msg-1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert!(err.to_string().contains("request_id"), "{err}");
}

/// A count of 0 is refused by name even when a call on the same key is
/// queued beside it: merged into that call, it would ride its range.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_count_of_zero_fails_beside_a_call_on_its_key() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    // One RPC in flight: the first call goes alone, the other two queue
    // behind it together.
    let client = c.client_with(ClientOptions {
        max_in_flight: 1,
        ..ClientOptions::default()
    });
    let (a, b, zero) = tokio::join!(
        client.next("conv", "z", 1),
        client.next("conv", "z", 1),
        client.next("conv", "z", 0),
    );
    assert_eq!(a.unwrap().first, 1);
    assert_eq!(b.unwrap().first, 2);
    let err = zero.expect_err("a count of 0 is refused");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("count"), "{err}");
}

/// Sum of `seqd_requests_total` samples for `op` (every code).
fn requests(metrics: &str, op: &str) -> f64 {
    let label = format!("op=\"{op}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("seqd_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `calls` concurrent `next("conv", ..., 2)` calls over 10 keys; every
/// `bad_every`-th key is over conv's 64 bytes. Returns each call's key and
/// outcome.
async fn concurrent_calls(
    client: &std::sync::Arc<seqd::client::Client>,
    calls: usize,
    bad_every: Option<usize>,
) -> Vec<(
    String,
    Result<seqd::pb::NextResponse, seqd::client::ClientError>,
)> {
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let client = client.clone();
            let key = match bad_every {
                Some(n) if i % n == 7 => "x".repeat(65),
                _ => format!("k{}", i % 10),
            };
            tokio::spawn(async move {
                let result = client.next("conv", &key, 2).await;
                (key, result)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// I1 over the answers, grouped by key; panics on any failed call.
fn assert_disjoint(
    answers: &[(
        String,
        Result<seqd::pb::NextResponse, seqd::client::ClientError>,
    )],
) {
    let mut got: std::collections::HashMap<&str, Vec<(u64, u32)>> = Default::default();
    for (key, result) in answers {
        let r = result
            .as_ref()
            .unwrap_or_else(|e| panic!("call for {key} failed: {e}"));
        assert_eq!(r.count, 2, "each caller gets the count it asked for");
        got.entry(key).or_default().push((r.first, r.count));
    }
    for (key, mut ranges) in got {
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[1].0 >= w[0].0 + u64::from(w[0].1),
                "key {key}: {:?} overlaps {:?}",
                w[0],
                w[1]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_share_rpcs_and_each_gets_its_own_answer() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = std::sync::Arc::new(c.client());

    let answers = concurrent_calls(&client, 300, None).await;
    assert_disjoint(&answers);
    let metrics = common::http_get(&c.node(1).metrics_addr, "/metrics").expect("metrics");
    let (next, batch) = (requests(&metrics, "Next"), requests(&metrics, "NextBatch"));
    assert!(
        batch >= 1.0 && next + batch < 300.0,
        "300 concurrent calls should share RPCs: {next} Next and {batch} NextBatch"
    );
    // The batches went over one NextStream, not an RPC each.
    let streams = common::metric(&c.node(1).metrics_addr, "seqd_next_streams_opened_total");
    assert_eq!(streams, Some(1.0), "batches should share one stream");

    // A bad call in a shared RPC fails alone; its neighbours are answered.
    let answers = concurrent_calls(&client, 300, Some(50)).await;
    let (bad, good): (Vec<_>, Vec<_>) = answers.into_iter().partition(|(k, _)| k.len() > 64);
    assert_eq!(bad.len(), 6);
    for (_, result) in bad {
        let err = result.expect_err("a key over the limit is refused");
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains("key"), "{err}");
    }
    assert_disjoint(&good);
}

/// A client's batch stream outlives its attempt timeout (1 s by default):
/// the timeout bounds each batch's reply, not the stream, so batches far
/// apart in time still share one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_batch_stream_outlives_the_attempt_timeout() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = std::sync::Arc::new(c.client());
    assert_disjoint(&concurrent_calls(&client, 50, None).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_disjoint(&concurrent_calls(&client, 50, None).await);
    let streams = common::metric(&c.node(1).metrics_addr, "seqd_next_streams_opened_total");
    assert_eq!(streams, Some(1.0), "one stream for both rounds");

    // A client dropped ends its streams: none stays open on the node.
    let open = || common::metric(&c.node(1).metrics_addr, "seqd_next_streams_open");
    assert_eq!(open(), Some(1.0));
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open() != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream of a dropped client is still open: {:?}",
            open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The runtime's worker count is one per CPU but one by default and
/// `--worker-threads` when given (the node says how many it runs with); a
/// node serves on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_serves_on_the_worker_threads_it_is_given() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = cpus.saturating_sub(1).max(1);
    assert!(
        c.log(1).contains(&format!("worker_threads={default}\n")),
        "by default one worker per CPU but one ({cpus} CPUs)"
    );
    let client = std::sync::Arc::new(c.client());
    assert_disjoint(&concurrent_calls(&client, 64, None).await);
    // More workers than the default: batches are handed between threads.
    let more = default + 1;
    c.terminate(1);
    c.spawn_with(1, &["--worker-threads", &more.to_string()]);
    c.wait_leader(Duration::from_secs(20)).await;
    assert!(
        c.log(1).contains(&format!("worker_threads={more}\n")),
        "the restarted node runs {more} workers"
    );
    let client = std::sync::Arc::new(c.client());
    assert_disjoint(&concurrent_calls(&client, 64, None).await);
}

/// Refills no call waits for share raise entries in the log (each costs a
/// synced write and, in a cluster, a replication round): a caller whose
/// every call queues a refill for another key, one call per RPC, gets
/// several refills per entry, not one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refills_ahead_of_need_share_log_entries() {
    const KEYS: usize = 100;
    const ROUNDS: usize = 10;
    // Batches of 100 ms (the default is 5): tens of calls in each however
    // slow the machine, so the test does not hang on its speed.
    let c = Cluster::start(1, &format!("{RAFT}\nrefill_batch_ms = 100"));
    c.wait_leader(Duration::from_secs(20)).await;
    let seq = c.sequencer(1).await;
    // "idle" refills by a fixed step of 1,000: after a first call, every
    // other call of 500 leaves 500 of room and queues a refill no call
    // waits for (it applies before the key comes round again).
    let call = |k: usize| {
        let req = seqd::pb::NextRequest {
            namespace: "idle".into(),
            key: format!("k{k}"),
            count: 500,
            request_id: String::new(),
        };
        let mut seq = seq.clone();
        async move { seq.next(req).await.expect("next") }
    };
    for k in 0..KEYS {
        call(k).await;
    }
    let addr = c.node(1).metrics_addr.clone();
    let counts = || {
        let refills = common::metric(&addr, "seqd_segment_refills_total").unwrap_or(0.0);
        let entries =
            common::metric(&addr, "seqd_raft_proposals_total{kind=\"raise\"}").unwrap_or(0.0);
        (refills, entries)
    };
    let (refills_before, entries_before) = counts();
    for _ in 0..ROUNDS {
        for k in 0..KEYS {
            call(k).await;
        }
    }
    let (refills_after, entries_after) = counts();
    let (refills, entries) = (
        refills_after - refills_before,
        entries_after - entries_before,
    );
    assert!(
        refills >= (KEYS * ROUNDS / 2) as f64 * 0.9,
        "{refills} refills for {} calls",
        KEYS * ROUNDS
    );
    assert!(
        refills >= 4.0 * entries,
        "{refills} refills in {entries} raise entries"
    );
    eprintln!("{refills} refills in {entries} raise entries");
}

/// The node turns transparent huge pages off for itself: zeroing a fresh
/// 2 MiB page on the node loop held calls for milliseconds. Checked where
/// the kernel has them at all (`THP_enabled` in /proc/PID/status, 5.0+).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_runs_without_transparent_huge_pages() {
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        eprintln!("this kernel has no transparent huge pages: nothing to check");
        return;
    }
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let pid = c.pid(1).expect("node 1 runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status:\n{status}"));
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

/// A value clap refuses that came from a `SEQD_*` variable is blamed on the
/// variable (clap names only the flag), and the node starts nothing.
#[test]
fn a_refused_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seqd"))
        .current_dir(dir.path())
        .env("SEQD_TICK_MS", "fifty")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'fifty' for '--tick-ms"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the environment variable SEQD_TICK_MS (no --tick-ms was given)"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a data directory was made"
    );
}
