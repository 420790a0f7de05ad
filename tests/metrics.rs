//! A real Prometheus (Debian's `prometheus`, installed by scripts/setup.sh)
//! scrapes a three-node cluster under load; its query API must report a
//! sane p99 allocation latency and exactly one leader. It loads the
//! alerting rules operators get (`docker/seqd-rules.yml`): every rule must
//! evaluate without error against the live metrics, and killing a node
//! must raise `SeqdNodeDown` for it and nothing about the leader.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_ports, Cluster, Load};
use seqd::pb::NextIdsRequest;

struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(c: &Cluster) -> Prometheus {
    let dir = c.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("'{}'", n.metrics_addr))
        .collect();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/seqd-rules.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\nscrape_configs:\n  - job_name: seqd\n    static_configs:\n      - targets: [{}]\n",
        rules.display(),
        targets.join(", ")
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus (installed by scripts/setup.sh)");
    Prometheus { child, addr }
}

/// The `ALERTS` series (pending or firing) for `alertname`, by their
/// `instance` label ("" for an alert over the whole cluster).
fn active_alerts(prom: &Prometheus, alertname: &str) -> Option<Vec<String>> {
    let q = format!("ALERTS{{alertname=\"{alertname}\"}}");
    let body = common::http_get(
        &prom.addr,
        &format!("/api/v1/query?query={}", common::encode(&q)),
    )?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if v["status"] != "success" {
        return None;
    }
    Some(
        v["data"]["result"]
            .as_array()?
            .iter()
            .map(|r| r["metric"]["instance"].as_str().unwrap_or("").to_string())
            .collect(),
    )
}

/// Polls `q` until `ok` accepts its value.
fn wait_query(prom: &Prometheus, q: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        last = common::prom_query(&prom.addr, q);
        if let Some(v) = last {
            if ok(v) {
                return v;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("query {q:?} never satisfied; last value {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_sees_latency_and_one_leader() {
    let mut c = Cluster::start(3, "tick_ms = 50\nelection_ticks = 10\nheartbeat_ticks = 2");
    let leader = c.wait_leader(Duration::from_secs(20)).await;
    let prom = start_prometheus(&c);

    // Every call its own `Next` RPC (no coalescing), so that the count
    // Prometheus scrapes can be held against the calls made.
    let client = Arc::new(c.unary_client());
    let load = Load::start(client.clone(), "conv", 50, 8);
    let mut ids = c.ids(1).await;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        client
            .next_batch("conv", &[("g1", 1), ("g2", 1), ("g3", 1)])
            .await
            .unwrap();
        let _ = ids.next_ids(NextIdsRequest { count: 100 }).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let up = wait_query(
        &prom,
        "count(up{job=\"seqd\"} == 1)",
        Duration::from_secs(30),
        |v| v == 3.0,
    );
    assert_eq!(up, 3.0, "all three targets up");
    let leaders = wait_query(
        &prom,
        "sum(seqd_raft_is_leader)",
        Duration::from_secs(30),
        |v| v == 1.0,
    );
    assert_eq!(leaders, 1.0, "exactly one leader");
    let p99 = wait_query(
        &prom,
        "histogram_quantile(0.99, sum by (le) (rate(seqd_request_duration_seconds_bucket{op=\"Next\"}[30s])))",
        Duration::from_secs(30),
        |v| v.is_finite() && v > 0.0,
    );
    let p99_ids = wait_query(
        &prom,
        "histogram_quantile(0.99, sum by (le) (rate(seqd_request_duration_seconds_bucket{op=\"NextIds\"}[30s])))",
        Duration::from_secs(30),
        |v| v.is_finite() && v > 0.0,
    );
    // The leadership check that every Next call waits for is seen too.
    let round_p50 = wait_query(
        &prom,
        "histogram_quantile(0.5, sum by (le) (rate(seqd_raft_read_index_round_seconds_bucket[30s])))",
        Duration::from_secs(30),
        |v| v.is_finite() && v > 0.0,
    );
    // The log's fsyncs (off the node loop) are timed: every node syncs
    // the ceilings the load raises.
    let syncs = wait_query(
        &prom,
        "min(seqd_raft_log_sync_seconds_count)",
        Duration::from_secs(30),
        |v| v > 0.0,
    );
    let sync_pending = wait_query(
        &prom,
        "max(seqd_raft_log_sync_pending_seconds)",
        Duration::from_secs(30),
        |v| v.is_finite(),
    );
    let calls = wait_query(
        &prom,
        "sum(seqd_requests_total{op=\"Next\",code=\"OK\"})",
        Duration::from_secs(30),
        |v| v > 0.0,
    );
    let (ops, errors) = load.finish().await;
    eprintln!("prometheus: Next p99 {p99:.6} s, NextIds p99 {p99_ids:.6} s, read round p50 {round_p50:.6} s, {calls} OK Next calls scraped, {} made", ops.len());
    assert!(errors.is_empty(), "{errors:?}");
    // Sane, not just present: a loopback allocation is well under a second,
    // and Prometheus saw a meaningful share of the calls made.
    assert!(p99 < 1.0, "Next p99 {p99} s");
    assert!(p99_ids < 1.0, "NextIds p99 {p99_ids} s");
    assert!(round_p50 < 1.0, "read round p50 {round_p50} s");
    assert!(syncs > 0.0, "{syncs} fsyncs on the node that synced least");
    assert!(
        sync_pending < 1.0,
        "a write waited {sync_pending} s for its fsync"
    );
    assert!(
        calls >= ops.len() as f64 / 10.0,
        "{calls} scraped of {} made",
        ops.len()
    );

    // Every alerting rule loaded and evaluated without error (a rule over
    // a label or series shape the metrics do not have fails here).
    common::wait_rules_evaluated(&prom.addr, Duration::from_secs(30));
    let outage = [
        "SeqdNodeDown",
        "SeqdMajorityDown",
        "SeqdNoLeader",
        "SeqdSplitLeadership",
    ];
    for name in outage {
        assert_eq!(
            active_alerts(&prom, name),
            Some(vec![]),
            "{name} active in a healthy cluster"
        );
    }

    // A follower dies: its node-down alert comes (pending within seconds;
    // firing after the rule's minute), and nothing about the leader.
    let follower = leader % 3 + 1;
    let dead = c.nodes[follower as usize - 1].metrics_addr.clone();
    c.kill(follower);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let down = active_alerts(&prom, "SeqdNodeDown");
        if down.as_deref() == Some(std::slice::from_ref(&dead)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SeqdNodeDown for {dead} never came: {down:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for name in ["SeqdMajorityDown", "SeqdNoLeader", "SeqdSplitLeadership"] {
        assert_eq!(
            active_alerts(&prom, name),
            Some(vec![]),
            "{name} active with two of three nodes up"
        );
    }
}
