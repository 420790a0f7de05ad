//! A slow fsync of the Raft log delays what needs the disk (a refill, a
//! cold key's first ceiling), not calls the leader answers from memory: the
//! log is synced off the node's loop (src/raft/node.rs, "Persistence").
//!
//! One real node; the test-only fault `sync_delay_ms` makes every fsync of
//! its log take 1.5 s. A call on a cold key must wait for that fsync, and a
//! call on a warm key made while it runs must be answered at once. An
//! fsync that does not return at all is a dead disk: the node stops.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use seqd::client::{Client, ClientOptions};
use seqd::pb::InjectFaultRequest;

const RAFT: &str = "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2";
const SYNC_DELAY: Duration = Duration::from_millis(1500);

async fn set_sync_delay(c: &Cluster, delay: Duration) {
    c.admin(1)
        .await
        .inject_fault(InjectFaultRequest {
            clock_offset_ms: 0,
            isolate: false,
            sync_delay_ms: delay.as_millis() as u32,
        })
        .await
        .expect("inject fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_key_is_answered_while_the_log_fsync_is_slow() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    // Every call its own RPC: the cold call's RPC must not carry the warm one.
    let client = c.unary_client();
    for expect in 1..=3 {
        assert_eq!(client.next("conv", "warm", 1).await.unwrap().first, expect);
    }

    set_sync_delay(&c, SYNC_DELAY).await;
    let started = Instant::now();
    let cold = async {
        let answer = client.next("conv", "cold", 1).await;
        (answer, started.elapsed())
    };
    let warm = async {
        // Ask once the cold call's ceiling is in the log and its fsync is
        // under way: the node reports a write waiting for one.
        let deadline = Instant::now() + Duration::from_secs(5);
        while common::metric(
            &c.node(1).metrics_addr,
            "seqd_raft_log_sync_pending_seconds",
        )
        .unwrap_or(0.0)
            <= 0.0
        {
            assert!(Instant::now() < deadline, "no write waited for an fsync");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asked = Instant::now();
        let answer = client.next("conv", "warm", 1).await;
        (answer, asked.elapsed(), started.elapsed())
    };
    let ((cold, cold_took), (warm, warm_took, warm_done)) = tokio::join!(cold, warm);
    set_sync_delay(&c, Duration::ZERO).await;

    assert_eq!(warm.expect("warm call").first, 4, "the warm key continues");
    assert_eq!(cold.expect("cold call").first, 1);
    // The fault took effect: the cold key's ceiling waited for the fsync.
    assert!(
        cold_took >= SYNC_DELAY - Duration::from_millis(100),
        "the cold call took {cold_took:?}: was the fsync delayed at all?"
    );
    // The warm call did not wait for it.
    assert!(
        warm_done < cold_took,
        "the warm call ({warm_took:?}) waited for the fsync ({cold_took:?})"
    );
    assert!(
        warm_took < Duration::from_millis(500),
        "the warm call took {warm_took:?} during a slow fsync"
    );
}

/// A log fsync that has not returned for 10 s means a dead disk: the node
/// stops with exit code 70, as on any storage failure, rather than keep
/// leading (and keep others from being elected) without being able to commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_fsync_does_not_return_stops() {
    let mut c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = c.client();
    assert_eq!(client.next("conv", "warm", 1).await.unwrap().first, 1);

    set_sync_delay(&c, Duration::from_secs(120)).await;
    // A cold key's ceiling needs the log, whose fsync now hangs.
    let cold = tokio::spawn(async move { client.next("conv", "cold", 1).await });
    let status = c
        .wait_exit(1, Duration::from_secs(30))
        .await
        .expect("the node still runs 30 s into a hung fsync");
    assert_eq!(status.code(), Some(70), "{status}");
    cold.abort();
}

/// A client that gives up on an attempt after 300 ms, well within one
/// delayed fsync.
fn impatient_client(c: &Cluster) -> Client {
    impatient_client_with(c, ClientOptions::default())
}

fn impatient_client_with(c: &Cluster, opts: ClientOptions) -> Client {
    c.client_with(ClientOptions {
        attempt_timeout: Duration::from_millis(300),
        ..opts
    })
}

/// A batch whose reply does not come within the client's attempt timeout
/// (cold keys waiting for a slow fsync) is given up on: its stream takes no
/// more batches (it may never answer), and the batch is sent again on a new
/// one until it is answered. Every attempt carries the batch's request id,
/// so the retries get the ranges the first attempt got: no number is handed
/// to nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_given_up_on_is_retried_on_a_new_stream() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = impatient_client(&c);
    let streams =
        || common::metric(&c.node(1).metrics_addr, "seqd_next_streams_opened_total").unwrap_or(0.0);
    // The first of three concurrent calls goes alone; the other two queue
    // behind it and leave together, as a batch on the stream.
    let warm = futures::future::join3(
        client.next("conv", "w1", 1),
        client.next("conv", "w2", 1),
        client.next("conv", "w3", 1),
    )
    .await;
    assert!(warm.0.is_ok() && warm.1.is_ok() && warm.2.is_ok());
    assert_eq!(streams(), 1.0);

    set_sync_delay(&c, Duration::from_millis(1000)).await;
    let started = Instant::now();
    let cold = futures::future::join3(
        client.next("conv", "c1", 1),
        client.next("conv", "c2", 1),
        client.next("conv", "c3", 1),
    )
    .await;
    let took = started.elapsed();
    set_sync_delay(&c, Duration::ZERO).await;

    // Every call is answered, each with its key's first number: the node
    // served the attempts given up on when the fsync returned, and the
    // retries got what those got.
    for (key, answer) in [("c1", cold.0), ("c2", cold.1), ("c3", cold.2)] {
        let answer = answer.unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!((answer.first, answer.count), (1, 1), "{key}");
    }
    assert!(
        took >= Duration::from_millis(900),
        "the cold calls took {took:?}: was the fsync delayed at all?"
    );
    assert!(
        streams() >= 2.0,
        "the batch given up on should have been sent again on a new stream ({} opened)",
        streams()
    );
}

/// A dense namespace stays gap-free when calls are retried: calls whose
/// raise waits for a slow fsync outlast the client's attempt timeout and
/// are sent again, several times, each time with the batch's request id.
/// The node answers the retries with the range the first attempt reserved
/// instead of reserving another (which would leave a hole once both
/// commit), so each key's numbers run 1, 2, 3, ... with nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_dense_calls_leave_no_hole() {
    dense_retries_leave_no_hole(ClientOptions::default()).await;
}

/// The same for a client that sends every call on its own
/// (`max_in_flight: 0`): each call carries a request id of the client's
/// own, kept by its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_single_dense_calls_leave_no_hole() {
    dense_retries_leave_no_hole(ClientOptions {
        max_in_flight: 0,
        ..ClientOptions::default()
    })
    .await;
}

async fn dense_retries_leave_no_hole(opts: ClientOptions) {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    let client = impatient_client_with(&c, opts);
    let keys = ["d1", "d2", "d3"];
    let round = || futures::future::join_all(keys.iter().map(|k| client.next("inbox", k, 1)));
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); keys.len()];
    let mut record = |answers: Vec<Result<seqd::pb::NextResponse, seqd::client::ClientError>>| {
        for (i, a) in answers.into_iter().enumerate() {
            let a = a.unwrap_or_else(|e| panic!("{}: {e}", keys[i]));
            got[i].push(a.first);
        }
    };
    record(round().await);

    set_sync_delay(&c, Duration::from_millis(1000)).await;
    let started = Instant::now();
    record(round().await);
    let took = started.elapsed();
    set_sync_delay(&c, Duration::ZERO).await;
    record(round().await);

    assert!(
        took >= Duration::from_millis(900),
        "the delayed round took {took:?}: were its calls retried at all?"
    );
    for (i, firsts) in got.iter().enumerate() {
        assert_eq!(firsts, &[1, 2, 3], "{}: a hole in a dense key", keys[i]);
    }
}

/// A call its client gives up on while it waits for the cluster (a cold key
/// behind a slow fsync) is still counted, as CANCELLED: tonic drops the
/// handler at the client's deadline, before it has an outcome to record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_given_up_on_is_counted_as_cancelled() {
    let c = Cluster::start(1, RAFT);
    c.wait_leader(Duration::from_secs(20)).await;
    set_sync_delay(&c, Duration::from_millis(1000)).await;
    let mut api = c.sequencer(1).await;
    let mut request = tonic::Request::new(seqd::pb::NextRequest {
        namespace: "conv".into(),
        key: "cold".into(),
        count: 1,
        request_id: String::new(),
    });
    request.set_timeout(Duration::from_millis(200));
    let err = api.next(request).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    set_sync_delay(&c, Duration::ZERO).await;
    let name = r#"seqd_requests_total{op="Next",code="CANCELLED"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::metric(&c.node(1).metrics_addr, name) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "{name}: {:?}",
            common::metric(&c.node(1).metrics_addr, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
