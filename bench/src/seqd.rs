//! seqd as a target: one or three `seqd` processes with generated configs,
//! leader discovery through `Admin.Status`, and callers that send sequence
//! calls to the leader and Snowflake calls to every node. `Next` calls go
//! through seqd's own client library (`seqd::client`, built without the
//! server), as a frontend would make them, or, for the raw rows, each as its
//! own RPC on a generated stub.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::cli::Op;
use crate::driver::{Caller, Done};
use crate::keys::KeyPicker;
use crate::process::{clear_env_prefix, free_ports, ChildGuard};

use seqd::pb::admin_client::AdminClient;
use seqd::pb::ids_client::IdsClient;
use seqd::pb::sequencer_client::SequencerClient;
use seqd::pb::{BatchItem, NextBatchRequest, NextIdsRequest, NextRequest, StatusRequest};

/// Response metadata a follower puts the leader's address in.
const LEADER_ADDR_HEADER: &str = "seqd-leader-addr";

/// A running seqd group. Field order matters: the processes are killed
/// (dropped) before their directory is removed.
pub struct SeqdCluster {
    nodes: Vec<ChildGuard>,
    addrs: Vec<String>,
    /// Each node's `/metrics` address.
    metrics: Vec<String>,
    /// `connections` channels per node, in node order.
    channels: Vec<Vec<Channel>>,
    leader: usize,
    /// seqd's client library for `Next`, shared by every caller; `None`
    /// sends each call as its own RPC.
    client: Option<Arc<seqd::client::Client>>,
    _dir: TempDir,
}

impl SeqdCluster {
    /// Starts `n` nodes and waits until one leads and serves and every node
    /// issues Snowflake IDs.
    pub async fn start(
        bin: &Path,
        n: usize,
        base: &Path,
        connections: usize,
        library_client: Option<seqd::client::ClientOptions>,
        lease: bool,
        timeout: Duration,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("seqcompare-seqd{n}-"))
            .tempdir_in(base)
            .with_context(|| format!("cannot create a temp dir in {}", base.display()))?;
        let ports = free_ports(2 * n)?;
        let (addrs, metrics): (Vec<String>, Vec<String>) = (
            ports[..n]
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            ports[n..]
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
        );
        let mut nodes = Vec::with_capacity(n);
        for id in 1..=n {
            let node_dir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&node_dir)?;
            let config = node_dir.join("seqd.toml");
            std::fs::write(
                &config,
                config_toml(id, &addrs, &node_dir.join("data"), lease),
            )
            .with_context(|| format!("cannot write {}", config.display()))?;
            let mut cmd = Command::new(bin);
            cmd.arg("--config")
                .arg(&config)
                .arg("--metrics-listen")
                .arg(&metrics[id - 1]);
            // SEQD_* in the caller's shell would override the file
            // (listen address, peers, data dir); keep only the log level
            // and the worker count (`SEQD_WORKER_THREADS=2
            // ./scripts/compare.sh` measures nodes on two threads each).
            clear_env_prefix(&mut cmd, "SEQD_", &["SEQD_LOG", "SEQD_WORKER_THREADS"]);
            nodes.push(ChildGuard::spawn(
                &format!("seqd node {id}"),
                cmd,
                &node_dir,
                node_dir.join("seqd.log"),
            )?);
        }
        let mut channels = Vec::with_capacity(n);
        for addr in &addrs {
            let mut per_node = Vec::with_capacity(connections);
            for _ in 0..connections {
                per_node.push(lazy_channel(addr)?);
            }
            channels.push(per_node);
        }
        let client = match library_client {
            Some(opts) => Some(Arc::new(
                seqd::client::Client::new(&addrs, opts).map_err(|e| anyhow!("seqd client: {e}"))?,
            )),
            None => None,
        };
        let mut cluster = Self {
            nodes,
            addrs,
            metrics,
            channels,
            leader: 0,
            client,
            _dir: dir,
        };
        cluster.wait_ready(timeout).await?;
        Ok(cluster)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(ChildGuard::pid).collect()
    }

    /// Every node's request duration histogram, summed; `None` if a node's
    /// `/metrics` does not answer.
    pub fn served(&self) -> Option<crate::served::Buckets> {
        let mut sum = crate::served::Buckets::default();
        for addr in &self.metrics {
            sum.add(&crate::served::Buckets::parse(&crate::served::scrape(
                addr,
            )?));
        }
        Some(sum)
    }

    /// Errors if any node has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.nodes.iter_mut().try_for_each(ChildGuard::check_alive)
    }

    /// Polls every node's status until one is a serving leader and every
    /// node has an active Snowflake worker; records the leader.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let (leader, report) = self.poll_status().await;
            if let Some(leader) = leader {
                self.leader = leader;
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: String = self
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("\n--- node {} log tail ---\n{}", i + 1, n.log_tail()))
                    .collect();
                bail!(
                    "seqd ({} nodes) not ready within {timeout:?} (no serving leader with every \
                     node issuing IDs):\n{report}{logs}",
                    self.nodes.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One round of `Admin.Status` to every node: the leader's index if the
    /// cluster is ready, and a line per node for error messages.
    async fn poll_status(&self) -> (Option<usize>, String) {
        let mut leader = None;
        let mut all_ids = true;
        let mut report = String::new();
        for (i, ch) in self.channels.iter().enumerate() {
            let mut admin = AdminClient::new(ch[0].clone());
            let status = tokio::time::timeout(
                Duration::from_secs(1),
                admin.status(StatusRequest::default()),
            )
            .await;
            match status {
                Ok(Ok(s)) => {
                    let s = s.into_inner();
                    let _ = writeln!(
                        report,
                        "  {}: role {} term {} leader {} serving {} ids_active {}",
                        self.addrs[i], s.role, s.term, s.leader_id, s.serving, s.ids_active
                    );
                    if s.role == "Leader" && s.serving {
                        leader = Some(i);
                    }
                    all_ids &= s.ids_active;
                }
                Ok(Err(e)) => {
                    let _ = writeln!(report, "  {}: {}: {}", self.addrs[i], e.code(), e.message());
                    all_ids = false;
                }
                Err(_) => {
                    let _ = writeln!(report, "  {}: Status timed out", self.addrs[i]);
                    all_ids = false;
                }
            }
        }
        (leader.filter(|_| all_ids), report)
    }

    /// Re-checks who leads before a workload (leadership may have moved).
    pub async fn refresh_leader(&mut self, timeout: Duration) -> Result<()> {
        self.wait_ready(timeout).await
    }

    /// One caller per `callers`, each with its own seeded key picker.
    pub fn callers(&self, op: Op, namespace: &str, pickers: Vec<KeyPicker>) -> Vec<SeqdCaller> {
        let by_addr: Arc<HashMap<String, Vec<Channel>>> = Arc::new(
            self.addrs
                .iter()
                .cloned()
                .zip(self.channels.iter().cloned())
                .collect(),
        );
        let namespace: Arc<str> = Arc::from(namespace);
        let n = self.channels.len();
        pickers
            .into_iter()
            .enumerate()
            .map(|(i, keys)| {
                let conns = &self.channels[self.leader];
                // Snowflake IDs come from every node: spread callers evenly.
                let ids_node = &self.channels[i % n];
                SeqdCaller {
                    op,
                    keys,
                    namespace: namespace.clone(),
                    slot: i,
                    seq: SequencerClient::new(conns[i % conns.len()].clone()),
                    ids: IdsClient::new(ids_node[(i / n) % ids_node.len()].clone()),
                    by_addr: by_addr.clone(),
                    client: self.client.clone(),
                }
            })
            .collect()
    }
}

fn lazy_channel(addr: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| anyhow!("bad address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// A node's configuration: raft-config/node1.toml's settings with this run's
/// ports and directories. Strings are written as JSON strings, which are
/// valid TOML basic strings (same escapes), so any path is quoted safely.
fn config_toml(id: usize, addrs: &[String], data_dir: &Path, lease: bool) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serialises");
    let mut t = String::new();
    let _ = writeln!(t, "# Generated by seqcompare for one benchmark run.");
    let _ = writeln!(t, "[node]\nid = {id}");
    let _ = writeln!(t, "listen = {}", q(&addrs[id - 1]));
    let _ = writeln!(t, "data_dir = {}\n", q(&data_dir.to_string_lossy()));
    for (i, addr) in addrs.iter().enumerate() {
        let _ = writeln!(t, "[[peers]]\nid = {}\naddr = {}\n", i + 1, q(addr));
    }
    let mode = if lease { "lease" } else { "read_index" };
    t.push_str(
        &r#"[raft]
tick_ms = 50
election_ticks = 10
heartbeat_ticks = 2
compact_threshold = 10000
request_timeout_ms = 3000
read_mode = "READ_MODE"

# Segmented: answered from memory, ceilings raised through Raft ahead of need.
[[namespaces]]
name = "conv"
mode = "segmented"
step_min = 1000
step_max = 1000000
refill_interval_ms = 1000
max_count = 10000
max_key_bytes = 256

# Dense: gap-free, every call waits for its Raft commit.
[[namespaces]]
name = "inbox"
mode = "dense"
step_min = 1000
step_max = 1000000
max_count = 10000
max_key_bytes = 256
"#
        .replace("READ_MODE", mode),
    );
    t
}

pub struct SeqdCaller {
    op: Op,
    keys: KeyPicker,
    namespace: Arc<str>,
    slot: usize,
    seq: SequencerClient<Channel>,
    ids: IdsClient<Channel>,
    by_addr: Arc<HashMap<String, Vec<Channel>>>,
    client: Option<Arc<seqd::client::Client>>,
}

impl SeqdCaller {
    /// After an UNAVAILABLE naming another leader, send there from now on.
    /// The failed call still counts as an error.
    fn follow_hint(&mut self, status: &tonic::Status) {
        if status.code() != Code::Unavailable {
            return;
        }
        let hint = status
            .metadata()
            .get(LEADER_ADDR_HEADER)
            .and_then(|v| v.to_str().ok());
        if let Some(conns) = hint.and_then(|addr| self.by_addr.get(addr)) {
            self.seq = SequencerClient::new(conns[self.slot % conns.len()].clone());
        }
    }
}

impl Caller for SeqdCaller {
    async fn call(&mut self) -> Result<Done, String> {
        let result = match self.op {
            Op::Next { count } if self.client.is_some() => {
                let client = self.client.as_ref().expect("checked above");
                // The library follows leader hints and retries itself.
                return match client.next(&self.namespace, &self.keys.key(), count).await {
                    Ok(r) => Ok(Done {
                        numbers: u64::from(r.count),
                        retries: 0,
                    }),
                    Err(e) => Err(e.to_string()),
                };
            }
            Op::Batch { fanout } if self.client.is_some() => {
                let client = self.client.as_ref().expect("checked above");
                let keys = self.keys.distinct_keys(fanout);
                let items: Vec<(&str, u32)> = keys.iter().map(|k| (k.as_str(), 1)).collect();
                // On the leader's stream, whole (all or nothing); the
                // answer without the keys, which the caller holds.
                return match client.next_batch_ranges(&self.namespace, &items).await {
                    Ok(r) => Ok(Done {
                        numbers: r.ranges.iter().map(|r| u64::from(r.count)).sum(),
                        retries: 0,
                    }),
                    Err(e) => Err(e.to_string()),
                };
            }
            Op::Ids { count } if self.client.is_some() => {
                let client = self.client.as_ref().expect("checked above");
                // Coalesced, to the client's one node, which it leaves for
                // another if it fails.
                return match client.next_ids(count).await {
                    Ok(r) => Ok(Done {
                        numbers: r.ids.len() as u64,
                        retries: 0,
                    }),
                    Err(e) => Err(e.to_string()),
                };
            }
            Op::Next { count } => self
                .seq
                .next(NextRequest {
                    namespace: self.namespace.to_string(),
                    key: self.keys.key(),
                    count,
                    request_id: String::new(),
                })
                .await
                .map(|r| u64::from(r.into_inner().count)),
            Op::Batch { fanout } => self
                .seq
                .next_batch(NextBatchRequest {
                    namespace: self.namespace.to_string(),
                    items: self
                        .keys
                        .distinct_keys(fanout)
                        .into_iter()
                        .map(|key| BatchItem { key, count: 1 })
                        .collect(),
                    request_id: String::new(),
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .ranges
                        .iter()
                        .map(|r| u64::from(r.count))
                        .sum()
                }),
            Op::Ids { count } => self
                .ids
                .next_ids(NextIdsRequest { count })
                .await
                .map(|r| r.into_inner().ids.len() as u64),
        };
        match result {
            Ok(numbers) => Ok(Done {
                numbers,
                retries: 0,
            }),
            Err(status) => {
                self.follow_hint(&status);
                Err(format!("{:?}: {}", status.code(), status.message()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_every_peer_and_quotes_paths() {
        let addrs = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let t = config_toml(2, &addrs, Path::new("/tmp/a \"b\"/data"), true);
        assert!(t.contains("id = 2\nlisten = \"127.0.0.1:2\""));
        assert!(t.contains("data_dir = \"/tmp/a \\\"b\\\"/data\""));
        assert_eq!(t.matches("[[peers]]").count(), 2);
        assert!(t.contains("name = \"conv\"") && t.contains("name = \"inbox\""));
        assert!(t.contains("read_mode = \"lease\"\n\n# Segmented"));
    }
}
