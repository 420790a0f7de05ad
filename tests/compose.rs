//! The docker compose cluster, started and broken for real: images built
//! FROM scratch on this machine, `docker-compose up`, load from the host
//! through the Rust client, then a killed leader, a paused follower, a node
//! cut off the network, and a restart of all three. Every number is checked
//! for I1/I2, every ID for uniqueness; everything is torn down, volumes
//! included, even when the test fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_history, free_ports, longest_stall, prom_query, IdLoad, Load};
use seqd::client::{Client, ClientOptions};

struct Compose {
    project: String,
    file: PathBuf,
    env: Vec<(String, String)>,
}

impl Compose {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run docker-compose")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn container(&self, service: &str) -> String {
        self.ok(&["ps", "-q", service]).trim().to_string()
    }

    fn network(&self) -> String {
        format!("{}_default", self.project)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.run(&["logs", "--tail=30", "--no-color"]);
            eprintln!("{}", String::from_utf8_lossy(&logs.stdout));
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

/// Takes down the clusters of earlier runs of this test whose process is
/// gone (killed, or its CI run ended by a time limit: `Drop` never ran),
/// volumes included. Their containers restart with the Docker daemon
/// (`restart: unless-stopped`) and would take cores from this run.
fn remove_stale_projects(file: &Path) {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=com.docker.compose.project",
            "--format",
            "{{.Label \"com.docker.compose.project\"}}",
        ])
        .output()
        .expect("run docker ps");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut stale: Vec<&str> = listed
        .lines()
        .filter(|p| {
            p.strip_prefix("seqdtest")
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                })
        })
        .collect();
    stale.sort_unstable();
    stale.dedup();
    for project in stale {
        eprintln!("removing the cluster of an earlier run that did not end: {project}");
        let _ = Command::new("docker-compose")
            .args(["-p", project, "-f"])
            .arg(file)
            .args(["down", "-v", "--remove-orphans", "-t", "1"])
            .output();
    }
}

fn docker(args: &[&str]) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `docker pause`, tried a few times: it failed once in CI with "OCI
/// runtime pause failed: unable to freeze" (the cgroup freezer gives up on
/// a process it cannot stop in time, likely one in an uninterruptible wait
/// such as an fsync on this VM's disk); the same test passed right after.
async fn pause(container: &str) {
    for _ in 0..4 {
        let out = Command::new("docker")
            .args(["pause", container])
            .output()
            .expect("run docker");
        if out.status.success() {
            return;
        }
        eprintln!(
            "docker pause {container}: {}; trying again",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    docker(&["pause", container]);
}

fn healthy(container: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "-f", "{{.State.Health.Status}}", container])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "healthy")
        .unwrap_or(false)
}

async fn leader(client: &Client, addrs: &[String]) -> Option<u64> {
    for a in addrs {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(500), client.node_status(a)).await
        {
            if s.role == "Leader" && s.serving {
                return Some(s.id);
            }
        }
    }
    None
}

/// How long a pause or a partition lasts: the fault itself, well past the
/// election timeout (0.5 to 1 s).
const FAULT_HOLD: Duration = Duration::from_secs(3);

async fn wait_healthy(containers: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !containers.iter().all(|c| healthy(c)) {
        assert!(Instant::now() < deadline, "cluster not healthy within 90 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every container healthy again and clients served through the cluster.
async fn recovered(containers: &[String], load: &Load) {
    wait_healthy(containers).await;
    load.progress(300, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compose_cluster_survives_kill_pause_partition_and_restart() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_seqd")).parent().unwrap();
    let build = Command::new(repo.join("scripts/docker-build.sh"))
        .env("SEQD_BIN_DIR", bin_dir)
        .output()
        .expect("run scripts/docker-build.sh");
    assert!(
        build.status.success(),
        "image build failed: {}",
        String::from_utf8_lossy(&build.stderr)
    );

    let ports = free_ports(7);
    let env: Vec<(String, String)> = vec![
        ("SEQD_NODE1_PORT".into(), ports[0].to_string()),
        ("SEQD_NODE2_PORT".into(), ports[1].to_string()),
        ("SEQD_NODE3_PORT".into(), ports[2].to_string()),
        ("SEQD_NODE1_METRICS".into(), ports[3].to_string()),
        ("SEQD_NODE2_METRICS".into(), ports[4].to_string()),
        ("SEQD_NODE3_METRICS".into(), ports[5].to_string()),
        ("SEQD_PROMETHEUS_PORT".into(), ports[6].to_string()),
    ];
    remove_stale_projects(&repo.join("docker-compose.yml"));
    let compose = Compose {
        project: format!("seqdtest{}", std::process::id()),
        file: repo.join("docker-compose.yml"),
        env,
    };
    compose.ok(&["up", "-d"]);
    let services = ["node1", "node2", "node3"];
    let containers: Vec<String> = services.iter().map(|s| compose.container(s)).collect();
    wait_healthy(&containers).await;

    let addrs: Vec<String> = ports[..3]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let client = Arc::new(Client::new(&addrs, ClientOptions::default()).unwrap());
    let load = Load::start(client.clone(), "conv", 30, 8);
    let ids = IdLoad::start(addrs.clone(), 50);
    load.progress(500, Duration::from_secs(60)).await;

    let mut faults = Vec::new();
    // 1. The leader's container killed; started again once another node
    //    leads and has served.
    let l = leader(&client, &addrs).await.expect("a leader") as usize;
    let t = Instant::now();
    docker(&["kill", &containers[l - 1]]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader(&client, &addrs)
        .await
        .is_none_or(|n| n as usize == l)
    {
        assert!(Instant::now() < deadline, "no new leader within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.progress(300, Duration::from_secs(30)).await;
    compose.ok(&["start", services[l - 1]]);
    faults.push(("kill leader", t));
    recovered(&containers, &load).await;

    // 2. A follower paused for longer than the election timeout.
    let l = leader(&client, &addrs).await.expect("a leader") as usize;
    let f = l % 3 + 1;
    let t = Instant::now();
    pause(&containers[f - 1]).await;
    tokio::time::sleep(FAULT_HOLD).await;
    docker(&["unpause", &containers[f - 1]]);
    faults.push(("pause follower", t));
    recovered(&containers, &load).await;

    // 3. One node cut off the compose network for as long.
    let cut = (leader(&client, &addrs).await.expect("a leader") as usize) % 3 + 1;
    let t = Instant::now();
    docker(&[
        "network",
        "disconnect",
        &compose.network(),
        &containers[cut - 1],
    ]);
    tokio::time::sleep(FAULT_HOLD).await;
    docker(&[
        "network",
        "connect",
        "--alias",
        services[cut - 1],
        &compose.network(),
        &containers[cut - 1],
    ]);
    faults.push(("partition one node", t));
    recovered(&containers, &load).await;

    // 4. All three restarted (SIGTERM: trim and hand over, one by one).
    let t = Instant::now();
    compose.ok(&["restart", "-t", "15", "node1", "node2", "node3"]);
    faults.push(("restart all", t));
    recovered(&containers, &load).await;

    let (ops, errors) = load.finish().await;
    let (ids, duplicates) = ids.finish().await;

    let numbers = check_history(&ops);
    assert_eq!(duplicates, 0, "duplicate Snowflake IDs");
    for (name, at) in &faults {
        let window: Vec<_> = ops
            .iter()
            .filter(|o| o.completed >= *at && o.completed < *at + Duration::from_secs(12))
            .cloned()
            .collect();
        let stall = longest_stall(&window, *at);
        eprintln!("compose: {name}: longest stall {stall:?}");
        assert!(!window.is_empty(), "{name}: nothing served afterwards");
        assert!(stall < Duration::from_secs(8), "{name}: stalled {stall:?}");
    }
    eprintln!(
        "compose: {} calls, {numbers} numbers checked, {} ids unique, {} client errors",
        ops.len(),
        ids.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "calls failed through the client: {errors:?}"
    );

    // Prometheus (in its container) scrapes all three.
    let prom = format!("127.0.0.1:{}", ports[6]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = prom_query(&prom, "count(up{job=\"seqd\"} == 1)");
        if up == Some(3.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus reports {up:?} targets up"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // It loaded the alerting rules (docker/seqd-rules.yml) and evaluates
    // them without error.
    common::wait_rules_evaluated(&prom, Duration::from_secs(30));
}
