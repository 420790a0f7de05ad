//! etcd as a target: a counter per key kept with compare-and-swap, the usual
//! way to build a sequence on etcd. Read the key's value and mod_revision,
//! then a transaction "if mod_revision is still what I read, put value +
//! count"; on a conflict the transaction's else branch reads the key again
//! (saving a round trip) and the caller retries.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse,
};
use tempfile::TempDir;

use crate::cli::Op;
use crate::driver::{Caller, Done};
use crate::keys::KeyPicker;
use crate::process::{clear_env_prefix, free_ports, ChildGuard};

/// Give up on one call after this many lost compare-and-swaps (counted as an
/// error: the key is too contended to make progress).
const MAX_ATTEMPTS: u32 = 1000;

/// A running single-node etcd; killed before its directory is removed.
pub struct EtcdServer {
    child: ChildGuard,
    endpoint: String,
    _dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd on two free ports. `max_txn_ops` is raised to fit a batch
    /// (etcd's default allows 128 operations per transaction).
    pub async fn start(
        bin: &Path,
        base: &Path,
        max_txn_ops: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("seqcompare-etcd-")
            .tempdir_in(base)
            .with_context(|| format!("cannot create a temp dir in {}", base.display()))?;
        let ports = free_ports(2)?;
        let client_url = format!("http://127.0.0.1:{}", ports[0]);
        let peer_url = format!("http://127.0.0.1:{}", ports[1]);
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--max-txn-ops", &max_txn_ops.max(128).to_string()])
            .args(["--logger", "zap", "--log-level", "warn"]);
        // ETCD_* variables in the caller's shell are read as flags by etcd.
        clear_env_prefix(&mut cmd, "ETCD_", &[]);
        let child = ChildGuard::spawn("etcd", cmd, dir.path(), dir.path().join("etcd.log"))?;
        let mut server = Self {
            child,
            endpoint: format!("127.0.0.1:{}", ports[0]),
            _dir: dir,
        };
        server.wait_ready(timeout).await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.child.check_alive()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.child.check_alive()?;
            let attempt = async {
                let mut kv = self.connect().await?.kv_client();
                kv.get("seqcompare-probe", None).await?;
                Ok::<_, anyhow::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if Instant::now() >= deadline => {
                    bail!(
                        "etcd not answering at {} within {timeout:?}: {e}",
                        self.endpoint
                    )
                }
                Err(_) if Instant::now() >= deadline => {
                    bail!("etcd not answering at {} within {timeout:?}", self.endpoint)
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn connect(&self) -> Result<Client> {
        let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
        Ok(Client::connect([self.endpoint.as_str()], Some(opts)).await?)
    }

    /// One caller per picker, sharing `connections` clients (each one gRPC
    /// connection).
    pub async fn callers(
        &self,
        op: Op,
        connections: usize,
        pickers: Vec<KeyPicker>,
    ) -> Result<Vec<EtcdCaller>> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            clients.push(self.connect().await?.kv_client());
        }
        Ok(pickers
            .into_iter()
            .enumerate()
            .map(|(i, keys)| EtcdCaller {
                op,
                keys,
                kv: clients[i % clients.len()].clone(),
            })
            .collect())
    }
}

/// A key's counter as last read: (value, mod_revision); a missing key reads
/// as (0, 0), and etcd compares a missing key's mod_revision as 0.
fn counter(kv: Option<&KeyValue>) -> Result<(u64, i64), String> {
    match kv {
        None => Ok((0, 0)),
        Some(kv) => {
            let text = std::str::from_utf8(kv.value()).map_err(|e| e.to_string())?;
            let value = text
                .parse::<u64>()
                .map_err(|e| format!("counter value {text:?}: {e}"))?;
            Ok((value, kv.mod_revision()))
        }
    }
}

/// Counters of the keys a transaction's get operations read, in order.
fn counters(responses: Vec<TxnOpResponse>) -> Result<Vec<(u64, i64)>, String> {
    responses
        .into_iter()
        .map(|r| match r {
            TxnOpResponse::Get(g) => counter(g.kvs().first()),
            other => Err(format!("unexpected transaction response {other:?}")),
        })
        .collect()
}

pub struct EtcdCaller {
    op: Op,
    keys: KeyPicker,
    kv: KvClient,
}

impl EtcdCaller {
    /// Adds `add` to each key's counter in one transaction, all or nothing.
    /// Returns the number of lost compare-and-swaps.
    async fn add(&mut self, keys: &[String], add: u64) -> Result<u32, String> {
        let err = |e: etcd_client::Error| e.to_string();
        let gets = || -> Vec<TxnOp> { keys.iter().map(|k| TxnOp::get(k.as_str(), None)).collect() };
        let mut seen = if let [key] = keys {
            vec![counter(
                self.kv
                    .get(key.as_str(), None)
                    .await
                    .map_err(err)?
                    .kvs()
                    .first(),
            )?]
        } else {
            // Several keys: read them in one round trip (one revision).
            counters(
                self.kv
                    .txn(Txn::new().and_then(gets()))
                    .await
                    .map_err(err)?
                    .op_responses(),
            )?
        };
        for attempt in 0..MAX_ATTEMPTS {
            let compares: Vec<Compare> = keys
                .iter()
                .zip(&seen)
                .map(|(k, (_, rev))| Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev))
                .collect();
            let puts: Vec<TxnOp> = keys
                .iter()
                .zip(&seen)
                .map(|(k, (value, _))| TxnOp::put(k.as_str(), (value + add).to_string(), None))
                .collect();
            let txn = Txn::new().when(compares).and_then(puts).or_else(gets());
            let resp = self.kv.txn(txn).await.map_err(err)?;
            if resp.succeeded() {
                return Ok(attempt);
            }
            seen = counters(resp.op_responses())?;
        }
        Err(format!(
            "compare-and-swap lost {MAX_ATTEMPTS} times in a row"
        ))
    }
}

impl Caller for EtcdCaller {
    async fn call(&mut self) -> Result<Done, String> {
        let (keys, add) = match self.op {
            Op::Next { count } => (vec![self.keys.key()], u64::from(count)),
            Op::Batch { fanout } => (self.keys.distinct_keys(fanout), 1),
            Op::Ids { .. } => return Err("etcd has no ID workload".into()),
        };
        let retries = self.add(&keys, add).await?;
        Ok(Done {
            numbers: add * keys.len() as u64,
            retries,
        })
    }
}
