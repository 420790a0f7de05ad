//! Snowflake IDs against real processes: unique across nodes, restarts,
//! worker churn, clock rollbacks and partitions (I5).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;
use seqd::core::Layout;
use seqd::pb::{
    AddNodeRequest, DecodeRequest, InjectFaultRequest, NextIdsRequest, RemoveNodeRequest,
};
use tonic::Code;

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";

fn layout() -> Layout {
    Layout::try_new(1_704_067_200_000, 41, 10, 12).unwrap()
}

async fn wait_ids_active(c: &Cluster, id: u64) {
    c.wait_status(id, Duration::from_secs(30), "issuing IDs", |s| s.ids_active)
        .await;
}

async fn fault(c: &Cluster, id: u64, clock_offset_ms: i64, isolate: bool) {
    c.admin(id)
        .await
        .inject_fault(InjectFaultRequest {
            clock_offset_ms,
            isolate,
            sync_delay_ms: 0,
        })
        .await
        .unwrap();
}

/// The IDs one caller got, in order, and the errors it saw.
type IssueTask = tokio::task::JoinHandle<(Vec<u64>, Vec<String>)>;

/// Calls NextIds on one node until stopped; returns every ID in call order
/// and the error messages seen, and a live count of IDs issued.
fn issue_loop(c: &Cluster, id: u64, stop: Arc<AtomicBool>) -> (IssueTask, Arc<AtomicUsize>) {
    let addr = c.node(id).addr.clone();
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let task = tokio::spawn(async move {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(Duration::from_secs(1))
            .connect_lazy();
        let mut api = seqd::pb::ids_client::IdsClient::new(ch);
        let mut ids = Vec::new();
        let mut errors = Vec::new();
        let mut n = 1;
        while !stop.load(Ordering::Relaxed) {
            n = n % 200 + 1;
            match api.next_ids(NextIdsRequest { count: n }).await {
                Ok(r) => {
                    let got = r.into_inner().ids;
                    counter.fetch_add(got.len(), Ordering::Relaxed);
                    ids.extend(got);
                }
                Err(e) => {
                    errors.push(e.message().to_string());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        (ids, errors)
    });
    (task, issued)
}

/// Waits until a node has issued `more` IDs beyond what it has now.
async fn wait_issued(node: u64, issued: &AtomicUsize, more: usize) {
    let target = issued.load(Ordering::Relaxed) + more;
    let deadline = Instant::now() + Duration::from_secs(30);
    while issued.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "node {node} issued no {more} IDs within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn assert_increasing(node: u64, ids: &[u64]) {
    for w in ids.windows(2) {
        assert!(w[0] < w[1], "node {node}: id {} after {}", w[1], w[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_stay_unique_across_restarts_and_worker_churn() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        wait_ids_active(&c, id).await;
    }
    let mut workers = HashSet::new();
    for id in 1..=3 {
        let s = c.status(id).await.unwrap();
        assert!(workers.insert(s.worker), "worker {} held twice", s.worker);
    }
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (restarted, churned) = (followers[0], followers[1]);

    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, issued): (Vec<_>, Vec<_>) =
        (1..=3).map(|id| issue_loop(&c, id, stop.clone())).unzip();
    let counter = |id: u64| issued[id as usize - 1].clone();
    for id in 1..=3 {
        wait_issued(id, &counter(id), 1_000).await;
    }

    // A crash and restart: the new incarnation starts above its fence.
    c.kill(restarted);
    c.spawn(restarted);
    wait_ids_active(&c, restarted).await;
    wait_issued(restarted, &counter(restarted), 1_000).await;

    // A node removed (its worker freed) and re-added with a fresh disk, as
    // a replaced container would be.
    let mut admin = c.admin(leader).await;
    admin
        .remove_node(RemoveNodeRequest { id: churned })
        .await
        .unwrap();
    c.kill(churned);
    std::fs::remove_dir_all(c.data_dir(churned)).unwrap();
    c.spawn_with(churned, &["--join"]);
    let addr = c.node(churned).addr.clone();
    admin
        .add_node(AddNodeRequest {
            id: churned,
            addr,
            voter: false,
        })
        .await
        .unwrap();
    c.wait_status(churned, Duration::from_secs(30), "caught up", |s| {
        s.learners.contains(&churned) && s.applied_index > 0
    })
    .await;
    let m = c.promote(leader, churned).await;
    assert!(m.voters.contains(&churned));
    wait_ids_active(&c, churned).await;
    wait_issued(churned, &counter(churned), 1_000).await;

    stop.store(true, Ordering::Relaxed);
    let mut all = HashSet::new();
    let mut total = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let node = i as u64 + 1;
        let (ids, _errors) = t.await.unwrap();
        assert!(!ids.is_empty(), "node {node} issued IDs");
        assert_increasing(node, &ids);
        total += ids.len();
        for id in ids {
            assert!(
                all.insert(id),
                "duplicate id {id} ({:?})",
                layout().decode(id)
            );
        }
    }
    let mut workers = HashSet::new();
    for id in 1..=3 {
        eprintln!("{:?}", c.status(id).await);
    }
    for id in 1..=3 {
        let s = c.status(id).await.unwrap();
        assert!(s.has_worker, "{s:?}");
        assert!(
            workers.insert(s.worker),
            "worker {} held twice: {s:?}",
            s.worker
        );
    }
    eprintln!("snowflake churn: {total} ids, all unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_rollbacks_never_repeat_or_reorder_ids() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let mut api = c.ids(1).await;
    let mut issued: Vec<u64> = Vec::new();
    let mut take = |ids: Vec<u64>| issued.extend(ids);

    take(
        api.next_ids(NextIdsRequest { count: 1000 })
            .await
            .unwrap()
            .into_inner()
            .ids,
    );
    let rollbacks = |outcome: &str| {
        let name = format!("seqd_clock_rollbacks_total{{outcome=\"{outcome}\"}}");
        common::metric(&c.node(1).metrics_addr, &name)
            .unwrap_or_else(|| panic!("{name} is exported from the start"))
    };
    assert_eq!((rollbacks("ridden"), rollbacks("refused")), (0.0, 0.0));
    // 50 ms back: ridden on the logical clock, no error; counted once.
    fault(&c, 1, -50, false).await;
    for _ in 0..5 {
        take(
            api.next_ids(NextIdsRequest { count: 100 })
                .await
                .unwrap()
                .into_inner()
                .ids,
        );
    }
    assert_eq!(rollbacks("ridden"), 1.0, "a step ridden is counted once");
    assert_eq!(rollbacks("refused"), 0.0);
    // 2 s and 1 h back: refused, naming the size of the jump; each call
    // refused is counted, each step measured (and logged) once.
    for (offset, at_least) in [(-2_000i64, 1_900u64), (-3_600_000, 3_599_000)] {
        fault(&c, 1, offset, false).await;
        for _ in 0..3 {
            let err = api.next_ids(NextIdsRequest { count: 1 }).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            let by: u64 = err
                .message()
                .split("clock moved back by ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("message names the jump: {}", err.message()));
            assert!(by >= at_least, "jump of {offset} ms reported as {by} ms");
        }
    }
    assert_eq!(rollbacks("refused"), 6.0, "each call refused is counted");
    let measured = common::metric(&c.node(1).metrics_addr, "seqd_clock_rollback_seconds_count");
    assert_eq!(measured, Some(3.0), "each step is measured once");
    let logged = c.log(1).matches("clock moved back too far").count();
    assert_eq!(logged, 2, "each refused step is logged once");
    fault(&c, 1, 0, false).await;
    take(
        api.next_ids(NextIdsRequest { count: 1000 })
            .await
            .unwrap()
            .into_inner()
            .ids,
    );

    // Restarted with the clock 10 s behind: nothing at or below the fence.
    c.kill(1);
    c.spawn_with(1, &["--clock-offset-ms=-10000"]);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let mut api = c.ids(1).await;
    let err = api.next_ids(NextIdsRequest { count: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("clock moved back by"),
        "{}",
        err.message()
    );
    fault(&c, 1, 0, false).await;
    let after = api
        .next_ids(NextIdsRequest { count: 1000 })
        .await
        .unwrap()
        .into_inner()
        .ids;
    issued.extend(after);

    assert_increasing(1, &issued);
    let unique: HashSet<u64> = issued.iter().copied().collect();
    assert_eq!(unique.len(), issued.len());
}

/// A clock set an hour ahead by mistake and set right a few seconds later:
/// the node goes on issuing throughout, its stamps and its fence stay at
/// the right time, and the metrics count the step held, then undone.
/// (Until session 30 the node stamped an hour ahead, then refused IDs for
/// the hour after its clock was set right, and its worker id's fence held
/// back the id's next holder as long.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clock_set_ahead_and_right_again_leaves_nothing_ahead() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let steps = |outcome: &str| {
        let name = format!("seqd_clock_forward_steps_total{{outcome=\"{outcome}\"}}");
        common::metric(&c.node(1).metrics_addr, &name)
            .unwrap_or_else(|| panic!("{name} is exported from the start"))
    };
    assert_eq!(
        (steps("held"), steps("believed"), steps("undone")),
        (0.0, 0.0, 0.0)
    );
    let real_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (task, issued) = issue_loop(&c, 1, stop.clone());
    wait_issued(1, &issued, 1_000).await;
    let before = c.status(1).await.unwrap().fence_ms;
    fault(&c, 1, 3_600_000, false).await;
    wait_issued(1, &issued, 1_000).await;
    // Fences renewed since the step (each 3 s ahead, renewed 2 s ahead,
    // so one a second): two or more.
    let ahead = c
        .wait_status(1, Duration::from_secs(20), "fences renewed", |s| {
            s.fence_ms >= before + 2_000
        })
        .await;
    wait_issued(1, &issued, 1_000).await;
    assert!(
        ahead.fence_ms < real_ms() + 10_000,
        "the fence followed the clock an hour ahead: {} against {}",
        ahead.fence_ms,
        real_ms()
    );
    fault(&c, 1, 0, false).await;
    wait_issued(1, &issued, 1_000).await;
    stop.store(true, Ordering::Relaxed);
    let (ids, errors) = task.await.unwrap();
    assert!(errors.is_empty(), "calls refused: {errors:?}");
    assert_increasing(1, &ids);
    let latest = real_ms() + 1_000;
    let stamps: Vec<u64> = ids
        .iter()
        .map(|id| layout().decode(*id).unwrap().0)
        .collect();
    let highest = stamps.iter().max().copied().unwrap_or_default();
    assert!(
        highest < latest,
        "a stamp {} ms ahead of the clock",
        highest - latest + 1_000
    );
    // Counted on the node's next tick.
    let deadline = Instant::now() + Duration::from_secs(5);
    while steps("undone") < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(steps("held"), 1.0);
    assert_eq!(steps("undone"), 1.0);
    assert_eq!(steps("believed"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_node_stops_at_its_fence() {
    let c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let cut = leader % 3 + 1;
    wait_ids_active(&c, cut).await;
    fault(&c, cut, 0, true).await;
    let isolated_at = Instant::now();
    let mut api = c.ids(cut).await;
    let mut last_ok = Vec::new();
    let err = loop {
        match api.next_ids(NextIdsRequest { count: 10 }).await {
            Ok(r) => last_ok = r.into_inner().ids,
            Err(e) => break e,
        }
        assert!(
            isolated_at.elapsed() < Duration::from_secs(15),
            "an isolated node must stop issuing at its fence"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("time fence reached"),
        "{}",
        err.message()
    );
    let fence = c.status(cut).await.unwrap().fence_ms;
    if let Some(last) = last_ok.last() {
        let (ts, _, _) = layout().decode(*last).unwrap();
        assert!(ts <= fence, "stamped {ts} past the fence {fence}");
    }
    // And so it stays: cut off, it hears no other node's renewal, and its
    // clock, which is right, is not taken for one ahead of theirs.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let err = api
            .next_ids(NextIdsRequest { count: 10 })
            .await
            .expect_err("an isolated node issued past its fence");
        assert!(
            err.message().contains("time fence reached"),
            "{}",
            err.message()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !c.log(cut).contains("clock is past the latest time fence"),
        "an isolated node took its clock for one ahead"
    );
    // The majority keeps issuing meanwhile; healed, the node resumes.
    let mut other = c.ids(leader).await;
    other.next_ids(NextIdsRequest { count: 10 }).await.unwrap();
    fault(&c, cut, 0, false).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while api.next_ids(NextIdsRequest { count: 1 }).await.is_err() {
        assert!(Instant::now() < deadline, "a healed node issues again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decode_returns_the_parts_and_bad_counts_are_rejected() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let mut api = c.ids(1).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let r = api
        .next_ids(NextIdsRequest { count: 3 })
        .await
        .unwrap()
        .into_inner();
    let d = api
        .decode(DecodeRequest { id: r.ids[1] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.worker, r.worker);
    assert!(
        d.unix_ms + 5_000 >= before && d.unix_ms <= before + 5_000,
        "{d:?}"
    );
    assert_eq!(
        layout().decode(r.ids[1]),
        Some((d.unix_ms, d.worker, d.sequence))
    );

    for count in [0, 100_001] {
        let err = api.next_ids(NextIdsRequest { count }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("count:"), "{}", err.message());
    }
    let err = api
        .decode(DecodeRequest { id: u64::MAX })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("id:"), "{}", err.message());
}

/// `NextIdsStream`: each request is answered by its id, a bad one by an
/// error in its reply (named as the unary RPC names it), and the stream goes
/// on; IDs keep increasing from one request to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_id_stream_answers_each_call_by_its_id_and_goes_on_after_a_bad_one() {
    use seqd::pb::{NextIdsStreamReply, NextIdsStreamRequest};
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let mut api = c.ids(1).await;
    let requests = [
        (10, Some(3)),
        (11, Some(0)),
        (12, None),
        (13, Some(100_001)),
        (14, Some(5)),
    ];
    let outgoing = futures::stream::iter(requests.map(|(id, count)| NextIdsStreamRequest {
        id,
        request: count.map(|count| NextIdsRequest { count }),
    }));
    let mut replies = api.next_ids_stream(outgoing).await.unwrap().into_inner();
    let mut by_id = std::collections::HashMap::new();
    while let Some(reply) = replies.message().await.unwrap() {
        let NextIdsStreamReply { id, ok, error } = reply;
        assert!(
            by_id.insert(id, (ok, error)).is_none(),
            "{id} answered twice"
        );
    }
    assert_eq!(by_id.len(), requests.len(), "{by_id:?}");
    let ids = |id: u64| by_id[&id].0.clone().expect("ok").ids;
    let error = |id: u64| by_id[&id].1.clone().expect("error");
    assert_eq!(ids(10).len(), 3);
    assert_eq!(ids(14).len(), 5);
    let all: Vec<u64> = ids(10).into_iter().chain(ids(14)).collect();
    assert_increasing(1, &all);
    for (id, starts) in [(11, "count:"), (12, "request: missing"), (13, "count:")] {
        let e = error(id);
        assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
        assert!(e.message.starts_with(starts), "{e:?}");
    }
}

/// A client's ID calls share one `NextIdsStream` to the node, counted in
/// the node's metrics, and the stream ends when the client is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clients_id_calls_share_one_stream_that_ends_with_the_client() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let client = Arc::new(c.client());
    let mut all = HashSet::new();
    for _ in 0..2 {
        let calls = (0..20).map(|_| {
            let client = client.clone();
            async move { client.next_ids(3).await.unwrap().ids }
        });
        for ids in futures::future::join_all(calls).await {
            assert_eq!(ids.len(), 3);
            assert_increasing(1, &ids);
            for id in ids {
                assert!(all.insert(id), "id {id} issued twice");
            }
        }
    }
    let metric = |name| common::metric(&c.node(1).metrics_addr, name);
    assert_eq!(metric("seqd_id_streams_opened_total"), Some(1.0));
    assert_eq!(metric("seqd_id_streams_open"), Some(1.0));
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric("seqd_id_streams_open") != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the ID stream of a dropped client is still open: {:?}",
            metric("seqd_id_streams_open")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The client's `next_ids`: concurrent callers share RPCs to one node; when
/// that node is killed they go on at another without a failed call, and
/// every ID handed out is unique, each call's strictly increasing and of
/// the count asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_ids_go_on_at_another_node_when_theirs_is_killed() {
    const CALLERS: u32 = 16;
    let mut c = Cluster::start(3, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let mut node_of_worker = std::collections::HashMap::new();
    for id in 1..=3 {
        wait_ids_active(&c, id).await;
        node_of_worker.insert(c.status(id).await.unwrap().worker, id);
    }
    let client = Arc::new(c.client());
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (1..=CALLERS)
        .map(|count| {
            let (client, stop, killed, calls) =
                (client.clone(), stop.clone(), killed.clone(), calls.clone());
            tokio::spawn(async move {
                // Each call's worker, IDs, and whether it started after
                // the kill.
                let mut got = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let late = killed.load(Ordering::SeqCst);
                    let r = client.next_ids(count).await.expect("next_ids");
                    assert_eq!(r.ids.len(), count as usize);
                    assert_increasing(r.worker, &r.ids);
                    got.push((r.worker, r.ids, late));
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                got
            })
        })
        .collect();
    let wait_calls = |more: usize| {
        let calls = calls.clone();
        async move {
            let target = calls.load(Ordering::Relaxed) + more;
            let deadline = Instant::now() + Duration::from_secs(30);
            while calls.load(Ordering::Relaxed) < target {
                assert!(Instant::now() < deadline, "no {more} calls within 30 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_calls(2_000).await;
    let used_worker = client.next_ids(1).await.unwrap().worker;
    let used = node_of_worker[&used_worker];
    c.kill(used);
    killed.store(true, Ordering::SeqCst);
    wait_calls(2_000).await;

    stop.store(true, Ordering::Relaxed);
    let mut all = HashSet::new();
    let (mut total_calls, mut late_calls) = (0, 0);
    for t in callers {
        for (worker, ids, late) in t.await.expect("caller") {
            total_calls += 1;
            if late {
                late_calls += 1;
                assert_ne!(worker, used_worker, "answered by the killed node {used}");
            }
            for id in ids {
                assert!(
                    all.insert(id),
                    "duplicate id {id} ({:?})",
                    layout().decode(id)
                );
            }
        }
    }
    assert!(late_calls >= 1_000, "{late_calls} calls after the kill");
    let ids = all.len();
    eprintln!("client next_ids: {total_calls} calls, {ids} ids, node {used} killed");
}

/// The layout is fixed for a data directory's life: restarted under another
/// epoch, a node refuses to start, naming both layouts (its worker id would
/// stamp IDs it stamped before), and under the first one it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_under_another_layout() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    c.kill(1);
    let original = c.rewrite_config(1, |text| {
        format!("{text}\n[snowflake]\nepoch_ms = 1700000000000\n")
    });
    c.spawn(1);
    let status = c
        .wait_exit(1, Duration::from_secs(20))
        .await
        .expect("the node stops");
    assert!(!status.success());
    let log = c.log(1);
    assert!(
        log.contains("snowflake layout changed")
            && log.contains("issued IDs under epoch_ms 1704067200000")
            && log.contains("the configuration says epoch_ms 1700000000000"),
        "{log}"
    );
    c.rewrite_config(1, |_| original);
    c.spawn(1);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
}

/// Every node of a cluster must stamp IDs under one layout: under other
/// bit widths, one node's IDs can equal another's whatever their worker
/// ids. A node configured with another layout, from its first start (its
/// directory records whatever it is given), is refused by its peers on
/// every stream, both ways, naming both layouts: it never gets a worker id
/// and issues nothing, and the others go on. Started again under the
/// cluster's layout, from a fresh directory, it joins and issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_another_layout_is_refused_by_its_peers() {
    let mut c = Cluster::start(3, RAFT);
    for id in 1..=3 {
        c.kill(id);
        let _ = std::fs::remove_dir_all(c.data_dir(id));
    }
    let original = c.rewrite_config(3, |text| {
        format!("{text}\n[snowflake]\nworker_bits = 11\nsequence_bits = 11\n")
    });
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    wait_ids_active(&c, 2).await;
    let refused = |log: &str| {
        log.contains("issues Snowflake IDs under another layout")
            && log.contains("time/worker/sequence bits 41/10/12")
            && log.contains("time/worker/sequence bits 41/11/11")
    };
    for id in 1..=3 {
        c.wait_log(id, Duration::from_secs(10), refused, |log| {
            format!("no layout refusal logged:\n{log}")
        })
        .await;
    }
    // Time enough to have joined, had it been let in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = c.status(3).await.expect("node 3 answers");
    assert!(!status.ids_active, "node 3 issues IDs under another layout");
    let leader = c.status(1).await.expect("node 1 answers");
    assert!(
        status.applied_index < leader.applied_index,
        "node 3 caught up: {status:?}"
    );
    let err = c
        .ids(3)
        .await
        .next_ids(NextIdsRequest { count: 1 })
        .await
        .expect_err("node 3 issued an ID");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let refusals = common::metric(
        &c.node(1).metrics_addr,
        "seqd_raft_peer_streams_refused_total",
    )
    .expect("node 1 exports its refusals");
    assert!(refusals >= 1.0, "{refusals}");

    c.kill(3);
    std::fs::remove_dir_all(c.data_dir(3)).unwrap();
    c.rewrite_config(3, |_| original);
    c.spawn(3);
    wait_ids_active(&c, 3).await;
    let mut workers = HashSet::new();
    for id in 1..=3 {
        let reply = c
            .ids(id)
            .await
            .next_ids(NextIdsRequest { count: 1 })
            .await
            .unwrap()
            .into_inner();
        let (_, worker, _) = layout().decode(reply.ids[0]).unwrap();
        workers.insert(worker);
    }
    assert_eq!(workers.len(), 3, "{workers:?}");
}

/// A node configured to hand out many IDs at once answers such a call
/// through the client whole: 500,000 IDs are a 4.5 MB reply, over gRPC's
/// usual 4 MiB limit, which both sides raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_id_call_fits_in_one_reply() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    c.kill(1);
    c.rewrite_config(1, |text| {
        format!("{text}\n[snowflake]\nmax_count = 600000\n")
    });
    c.spawn(1);
    c.wait_leader(Duration::from_secs(20)).await;
    wait_ids_active(&c, 1).await;
    let client = c.client();
    let got = client.next_ids(500_000).await.unwrap();
    assert_eq!(got.ids.len(), 500_000);
    assert!(got.ids.windows(2).all(|w| w[0] < w[1]));
}

/// Every node estimates how far its peers' clocks are from its own, from
/// the stamps on the Raft frames they send (the leader hears every
/// follower, a follower the leader): a follower whose clock is set 5 s
/// ahead shows 5 s ahead on the leader and the leader 5 s behind on it,
/// the other follower stays near 0, the leader logs a warning naming the
/// peer, and once the clock is set right the estimate comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_see_a_clock_set_ahead() {
    let c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let skewed = leader % 3 + 1;
    let other = 6 - leader - skewed;
    fault(&c, skewed, 5_000, false).await;

    let offset = |observer: u64, peer: u64| {
        common::metric(
            &c.node(observer).metrics_addr,
            &format!("seqd_peer_clock_offset_seconds{{peer=\"{peer}\"}}"),
        )
    };
    let wait_offsets = |expected: Vec<(u64, u64, f64)>| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen: Vec<Option<f64>> = expected
                .iter()
                .map(|&(observer, peer, _)| offset(observer, peer))
                .collect();
            let close = expected
                .iter()
                .zip(&seen)
                .all(|(&(_, _, want), got)| got.is_some_and(|got| (got - want).abs() < 0.3));
            if close {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "clock offsets (observer, peer, expected) {expected:?}: seen {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    wait_offsets(vec![
        (leader, skewed, 5.0),
        (leader, other, 0.0),
        (skewed, leader, -5.0),
        (other, leader, 0.0),
    ])
    .await;
    // seqctl shows it: the leader's estimate of each node's clock.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .args(["--endpoints", &c.addrs().join(","), "status", "--json"])
        .output()
        .expect("run seqctl");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("seqctl json");
    let leader_row = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == leader)
        .expect("the leader's row");
    let seen = leader_row["peer_clocks_ms"][skewed.to_string()]
        .as_i64()
        .expect("the leader's estimate of the skewed node's clock");
    assert!((seen - 5_000).abs() < 300, "{leader_row}");
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_seqctl"))
        .args(["--endpoints", &c.addrs().join(","), "status"])
        .output()
        .expect("run seqctl");
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let row = table
        .lines()
        .find(|l| l.contains(&c.node(skewed).addr))
        .expect("the skewed node's row");
    assert!(row.contains("+5.0s") || row.contains("+4.9s"), "{table}");
    let warning = format!("peer={skewed}");
    c.wait_log(
        leader,
        Duration::from_secs(10),
        |log| {
            log.lines().any(|l| {
                l.contains("a peer's clock is far from this node's") && l.contains(&warning)
            })
        },
        |_| format!("no warning about node {skewed}'s clock"),
    )
    .await;

    fault(&c, skewed, 0, false).await;
    wait_offsets(vec![(leader, skewed, 0.0), (skewed, leader, 0.0)]).await;
}

/// Ten IDs from node `id`.
async fn next_ten(c: &Cluster, id: u64) -> Result<Vec<u64>, tonic::Status> {
    let mut api = c.ids(id).await;
    let r = api.next_ids(NextIdsRequest { count: 10 }).await?;
    Ok(r.into_inner().ids)
}

/// Sets node `id`'s clock right and waits until it issues, `within`; its
/// IDs may be stamped up to a fence's reach ahead of the real time (a node
/// restarted starts above its last fence), not the step it was set back by.
async fn set_right_and_issue(c: &Cluster, id: u64, within: Duration) {
    fault(c, id, 0, false).await;
    let deadline = Instant::now() + within;
    let ids = loop {
        match next_ten(c, id).await {
            Ok(ids) => break ids,
            Err(e) => assert!(
                Instant::now() < deadline,
                "not issuing {within:?} after its clock was set right: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let real_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for id in ids {
        let (ts, _, _) = layout().decode(id).unwrap();
        assert!(
            ts <= real_ms + 3_500,
            "ID {id} stamped {} ms ahead of the real time",
            ts - real_ms
        );
    }
}

/// A node restarted with its clock a minute ahead issues nothing and
/// commits no fence ahead: its time is past every fence the other nodes
/// commit, so it answers UNAVAILABLE naming that, renews no fence, and
/// logs it. Once its clock is set right it issues within seconds, stamped
/// at the right time (a fence committed a minute ahead would have it
/// refuse IDs for that minute, and its stamps would sort after every
/// other node's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_with_its_clock_ahead_issues_nothing_until_set_right() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let skewed = leader % 3 + 1;
    wait_ids_active(&c, skewed).await;
    c.kill(skewed);
    c.spawn_with(skewed, &["--clock-offset-ms=60000"]);

    let ahead = "past the latest time fence another node committed";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match next_ten(&c, skewed).await {
            Ok(ids) => panic!("issued {ids:?} with its clock a minute ahead"),
            Err(e) if e.code() == Code::Unavailable && e.message().contains(ahead) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "never refused for its clock: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It stays so (the other nodes go on), and says so in its log.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        if let Ok(ids) = next_ten(&c, skewed).await {
            panic!("issued {ids:?} with its clock a minute ahead");
        }
        next_ten(&c, leader)
            .await
            .expect("the leader issues meanwhile");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.wait_log(
        skewed,
        Duration::from_secs(20),
        |log| log.contains("this node's clock is past the latest time fence"),
        |_| "no error logged about its clock".into(),
    )
    .await;
    let status = c.status(skewed).await.expect("status");
    assert!(!status.ids_active, "{status:?}");
    assert!(
        (55_000..62_000).contains(&status.ahead_of_cluster_ms),
        "{status:?}"
    );

    set_right_and_issue(&c, skewed, Duration::from_secs(10)).await;
    // Nor did it commit a fence ahead: restarted, a node starts above its
    // last fence, and would refuse IDs until the clock reached it.
    c.kill(skewed);
    c.spawn(skewed);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match next_ten(&c, skewed).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "not issuing 15 s after a restart: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A clock step forward that holds past the trust period is believed, and
/// then the node's time runs past the other nodes' fences: the node, which
/// was issuing, refuses IDs (UNAVAILABLE naming it) and stops counting as
/// issuing (status, and the `seqd.v1.Ids` health it drives); set right, it
/// issues again, stamped at the right time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_believed_step_ahead_of_the_cluster_stops_a_node_issuing() {
    let mut c = Cluster::start(3, RAFT);
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let skewed = leader % 3 + 1;
    c.kill(skewed);
    c.rewrite_config(skewed, |text| {
        format!("{text}\n[snowflake]\ntrust_forward_step_ms = 500\n")
    });
    c.spawn(skewed);
    wait_ids_active(&c, skewed).await;
    next_ten(&c, skewed).await.expect("issuing before the step");

    fault(&c, skewed, 30_000, false).await;
    let ahead = "past the latest time fence another node committed";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match next_ten(&c, skewed).await {
            Err(e) if e.code() == Code::Unavailable && e.message().contains(ahead) => break,
            other => assert!(
                Instant::now() < deadline,
                "still {other:?} 20 s after a step of 30 s believed in 0.5 s"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.wait_status(
        skewed,
        Duration::from_secs(10),
        "not counted as issuing",
        |s| !s.ids_active,
    )
    .await;

    set_right_and_issue(&c, skewed, Duration::from_secs(15)).await;
}

/// Every node restarted at once: each knows the others' workers only from
/// its disk and waits to hear one of their renewals before it renews its
/// own (so that its clock can be compared first), and none renews first.
/// The wait is bounded: every node issues again within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_restarted_at_once_issues_again() {
    let mut c = Cluster::start(3, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        wait_ids_active(&c, id).await;
    }
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_leader(Duration::from_secs(20)).await;
    for id in 1..=3 {
        wait_ids_active(&c, id).await;
        next_ten(&c, id).await.expect("issuing after the restart");
    }
}
