//! Shared helpers: real `seqd` processes on loopback with data in temp dirs,
//! and a checker for I1/I2 over a recorded history.

#![allow(dead_code)]

pub mod netns;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use seqd::client::{Client, ClientOptions};
use seqd::pb::StatusResponse;

/// Namespaces every test cluster has.
pub const NAMESPACES: &str = r#"
[[namespaces]]
name = "conv"
mode = "segmented"
step_min = 50
step_max = 5000
refill_interval_ms = 200
max_count = 1000
max_key_bytes = 64

[[namespaces]]
name = "inbox"
mode = "dense"
step_min = 1
step_max = 1
max_count = 1000
max_key_bytes = 64

[[namespaces]]
name = "idle"
mode = "segmented"
step_min = 1000
step_max = 1000
max_count = 1000
max_key_bytes = 64
forget_idle_ms = 1000

[[namespaces]]
name = "tiny"
mode = "segmented"
step_min = 10
step_max = 10
max_count = 50
max_key_bytes = 8
max_value = 100
"#;

#[path = "../../bench/src/ports.rs"]
mod ports;

/// Free loopback ports below the ephemeral range, which the nodes'
/// outgoing connections cannot take before the nodes bind them.
pub fn free_ports(n: usize) -> Vec<u16> {
    ports::free_ports(n).expect("free loopback ports")
}

pub struct Node {
    pub id: u64,
    pub addr: String,
    /// Prometheus `/metrics` address.
    pub metrics_addr: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of real seqd processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    extra_args: Vec<String>,
    /// Set when every node runs in its own network namespace. Dropped after
    /// the processes are killed (field order).
    pub net: Option<netns::Net>,
}

impl Cluster {
    /// Starts `n` nodes on loopback with `raft_section` (TOML lines under
    /// `[raft]`).
    pub fn start(n: usize, raft_section: &str) -> Self {
        let ports = free_ports(2 * n);
        let addrs: Vec<String> = ports[..n]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let metrics: Vec<String> = ports[n..]
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        Self::start_at(addrs, metrics, raft_section, None)
    }

    /// Starts `n` nodes, each in its own network namespace with its own
    /// address (see [`netns::Net`]), so tests can cut real links.
    pub fn start_netns(n: usize, raft_section: &str) -> Self {
        let net = netns::Net::create(n);
        let ids = 1..=n as u64;
        let addrs = ids
            .clone()
            .map(|id| format!("{}:7000", net.ip(id)))
            .collect();
        let metrics = ids.map(|id| format!("{}:9100", net.ip(id))).collect();
        Self::start_at(addrs, metrics, raft_section, Some(net))
    }

    fn start_at(
        addrs: Vec<String>,
        metrics: Vec<String>,
        raft_section: &str,
        net: Option<netns::Net>,
    ) -> Self {
        let n = addrs.len();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut peers = String::new();
        for (i, a) in addrs.iter().enumerate() {
            peers.push_str(&format!("[[peers]]\nid = {}\naddr = \"{a}\"\n\n", i + 1));
        }
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as u64 + 1;
            let data = dir.path().join(format!("node{id}"));
            let config = dir.path().join(format!("node{id}.toml"));
            let text = format!(
                "[node]\nid = {id}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\n\n{peers}[raft]\n{raft_section}\n\n[testing]\nallow_fault_injection = true\n\n[metrics]\nlisten = \"{}\"\n{NAMESPACES}",
                data.display(),
                metrics[i]
            );
            std::fs::write(&config, text).expect("write config");
            nodes.push(Node {
                id,
                addr: addr.clone(),
                metrics_addr: metrics[i].clone(),
                config,
                log: dir.path().join(format!("node{id}.log")),
                child: None,
            });
        }
        let mut cluster = Self {
            dir,
            nodes,
            extra_args: Vec::new(),
            net,
        };
        for id in 1..=n as u64 {
            cluster.spawn(id);
        }
        cluster
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Starts (or restarts) node `id`'s process.
    pub fn spawn(&mut self, id: u64) {
        self.spawn_with(id, &[]);
    }

    /// Like [`Cluster::spawn`], with extra command-line flags.
    pub fn spawn_with(&mut self, id: u64, args: &[&str]) {
        let node = &mut self.nodes[id as usize - 1];
        assert!(node.child.is_none(), "node {id} already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open log");
        let bin = env!("CARGO_BIN_EXE_seqd");
        // `ip netns exec` execs the binary in place: the child is seqd itself,
        // so signals reach it directly.
        let mut cmd = match &self.net {
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.ns(id), bin]);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("--config")
            .arg(&node.config)
            .args(&self.extra_args)
            .args(args)
            .env("SEQD_LOG", "info,raft=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn seqd");
        node.child = Some(child);
    }

    /// SIGKILL: no shutdown work at all, like a crash.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes[id as usize - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: the graceful path (trim and hand over).
    pub fn terminate(&mut self, id: u64) {
        if let Some(mut child) = self.nodes[id as usize - 1].child.take() {
            signal(&child, "TERM");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(status.success(), "node {id} exited with {status}");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("node {id} did not stop within 15 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Waits up to `within` for node `id` to exit by itself; its status.
    pub async fn wait_exit(
        &mut self,
        id: u64,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let child = self.nodes[id as usize - 1].child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.nodes[id as usize - 1].child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// SIGSTOP, returning once the process has stopped (state `T` in
    /// `/proc/<pid>/stat`): the signal takes effect a moment after it is
    /// sent, and on a loaded machine the node may answer a call or send a
    /// message in between, which a test would take for the stopped node's.
    pub async fn pause(&mut self, id: u64) {
        let Some(child) = &self.nodes[id as usize - 1].child else {
            return;
        };
        signal(child, "STOP");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            if state == Some("T") {
                return;
            }
            assert!(Instant::now() < deadline, "node {id} not stopped: {stat}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&mut self, id: u64) {
        if let Some(child) = &self.nodes[id as usize - 1].child {
            signal(child, "CONT");
        }
    }

    /// Admin API of node `id`.
    pub async fn admin(
        &self,
        id: u64,
    ) -> seqd::pb::admin_client::AdminClient<tonic::transport::Channel> {
        seqd::pb::admin_client::AdminClient::connect(format!("http://{}", self.node(id).addr))
            .await
            .expect("connect admin")
    }

    /// Sequencer API of node `id` (raw RPCs, without the client library).
    pub async fn sequencer(
        &self,
        id: u64,
    ) -> seqd::pb::sequencer_client::SequencerClient<tonic::transport::Channel> {
        seqd::pb::sequencer_client::SequencerClient::connect(format!(
            "http://{}",
            self.node(id).addr
        ))
        .await
        .expect("connect sequencer")
    }

    /// Ids API of node `id`.
    pub async fn ids(&self, id: u64) -> seqd::pb::ids_client::IdsClient<tonic::transport::Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.node(id).addr))
            .expect("endpoint")
            .timeout(Duration::from_secs(2))
            .connect_lazy();
        seqd::pb::ids_client::IdsClient::new(ch)
    }

    pub fn client(&self) -> Client {
        self.client_with(ClientOptions::default())
    }

    pub fn client_with(&self, opts: ClientOptions) -> Client {
        Client::new(&self.addrs(), opts).expect("client")
    }

    /// A client that sends every call as its own RPC (no coalescing).
    pub fn unary_client(&self) -> Client {
        self.client_with(ClientOptions {
            max_in_flight: 0,
            ..ClientOptions::default()
        })
    }

    /// Status of one node, `None` if it does not answer.
    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        let client = Client::new(&[self.node(id).addr.clone()], ClientOptions::default()).ok()?;
        tokio::time::timeout(
            Duration::from_millis(500),
            client.node_status(&self.node(id).addr),
        )
        .await
        .ok()?
        .ok()
    }

    /// Waits until a running node reports that it serves as leader.
    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            for n in &self.nodes {
                if !n.is_running() {
                    continue;
                }
                if let Some(s) = self.status(n.id).await {
                    if s.serving {
                        return s.id;
                    }
                }
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("no serving leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a node other than `not` serves as leader.
    pub async fn wait_other_leader(&self, not: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            for n in &self.nodes {
                if n.id == not || !n.is_running() {
                    continue;
                }
                if let Some(s) = self.status(n.id).await {
                    if s.serving {
                        return s.id;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no new leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id` is back in the cluster: it knows a leader and
    /// has applied everything it knows to be committed.
    pub async fn wait_rejoined(&self, id: u64, within: Duration) {
        self.wait_status(id, within, "rejoined", |s| {
            s.leader_id != 0 && s.applied_index > 0 && s.applied_index >= s.commit_index
        })
        .await;
    }

    /// Waits for `cond` on node `id`'s status.
    pub async fn wait_status(
        &self,
        id: u64,
        within: Duration,
        what: &str,
        cond: impl Fn(&StatusResponse) -> bool,
    ) -> StatusResponse {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.status(id).await {
                if cond(&s) {
                    return s;
                }
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!(
                    "node {id}: {what} not reached within {within:?}: {:?}",
                    self.status(id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `id`'s log satisfies `cond`; past `within`, panics
    /// with `what` said of the log (and the logs' tails).
    pub async fn wait_log(
        &self,
        id: u64,
        within: Duration,
        cond: impl Fn(&str) -> bool,
        what: impl Fn(&str) -> String,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log(id);
            if cond(&log) {
                return;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("node {id}, after {within:?}: {}", what(&log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            // A panic's backtrace fills the tail: its message comes first.
            let lines: Vec<&str> = text.lines().collect();
            for (i, _) in lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.contains("panicked at"))
            {
                eprintln!("----- node {} panicked -----", n.id);
                for line in lines.iter().skip(i.saturating_sub(5)).take(8) {
                    eprintln!("{line}");
                }
            }
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("----- node {} log (last 40 lines) -----", n.id);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }

    /// Node `id`'s log so far.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[id as usize - 1].log).unwrap_or_default()
    }

    /// Node `id`'s process id, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes[id as usize - 1].child.as_ref().map(|c| c.id())
    }

    /// Promotes learner `id` through node `via`'s admin API. The leader
    /// refuses until the learner is caught up (replicated entry by entry,
    /// near the log's end), which a learner that has applied something may
    /// not be yet: refusals saying so are retried.
    pub async fn promote(&self, via: u64, id: u64) -> seqd::pb::MembershipResponse {
        let addr = self.node(id).addr.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = self.admin(via).await;
        loop {
            let request = seqd::pb::AddNodeRequest {
                id,
                addr: addr.clone(),
                voter: true,
            };
            match admin.add_node(request).await {
                Ok(m) => return m.into_inner(),
                Err(e) if e.message().contains("answer now") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("promote node {id} via {via}: {e}"),
            }
        }
    }

    /// Rewrites node `id`'s configuration file (read at its next spawn)
    /// with `edit`; returns the text it had.
    pub fn rewrite_config(&self, id: u64, edit: impl FnOnce(&str) -> String) -> String {
        let path = &self.nodes[id as usize - 1].config;
        let original = std::fs::read_to_string(path).expect("read config");
        std::fs::write(path, edit(&original)).expect("write config");
        original
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} failed");
}

/// One completed call: which key, when it started and ended, what it got.
#[derive(Debug, Clone)]
pub struct Op {
    pub key: String,
    pub invoked: Instant,
    pub completed: Instant,
    pub first: u64,
    pub last: u64,
    /// The reply's epoch and whether it was replayed from a request record
    /// (shown when a check fails).
    pub epoch: u64,
    pub replayed: bool,
}

/// Checks I1 (no number handed out twice per key) and I2 (a call that
/// started after another completed got greater numbers) over every
/// completed call. Returns the number of numbers checked.
pub fn check_history(ops: &[Op]) -> usize {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in ops {
        assert!(op.first >= 1 && op.last >= op.first, "bad range {op:?}");
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut numbers = 0;
    for (key, mut ops) in by_key {
        // I1: ranges of one key never overlap.
        ops.sort_by_key(|o| o.first);
        for w in ops.windows(2) {
            assert!(
                w[1].first > w[0].last,
                "I1 violated for key {key}: {:?} overlaps {:?}",
                w[0],
                w[1]
            );
        }
        numbers += ops
            .iter()
            .map(|o| (o.last - o.first + 1) as usize)
            .sum::<usize>();
        // I2: sweep calls by start time, tracking the largest number of every
        // call that completed before it.
        let mut by_completion = ops.clone();
        by_completion.sort_by_key(|o| o.completed);
        let mut by_invocation = ops;
        by_invocation.sort_by_key(|o| o.invoked);
        let mut done = 0;
        let mut max_done: Option<&Op> = None;
        for b in by_invocation {
            while done < by_completion.len() && by_completion[done].completed < b.invoked {
                let a = by_completion[done];
                if max_done.is_none_or(|m| a.last > m.last) {
                    max_done = Some(a);
                }
                done += 1;
            }
            if let Some(a) = max_done {
                assert!(
                    b.first > a.last,
                    "I2 violated for key {key}: {b:?} started after {a:?} completed but got a smaller number"
                );
            }
        }
    }
    numbers
}

/// Checks a dense namespace's promise over a history in which no call
/// failed (a failed call may have taken numbers no one saw): each key's
/// numbers are consecutive from 1, whatever leaders came and went.
/// Returns the number of numbers checked.
pub fn check_dense(ops: &[Op]) -> usize {
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut numbers = 0;
    for (key, mut ops) in by_key {
        ops.sort_by_key(|o| o.first);
        let mut next = 1;
        let mut prev: Option<&Op> = None;
        for op in ops {
            assert!(
                op.first == next,
                "dense key {key} skips or repeats: {prev:?} then {op:?} (expected {next} next)"
            );
            numbers += (op.last - op.first + 1) as usize;
            next = op.last + 1;
            prev = Some(op);
        }
    }
    numbers
}

/// Concurrent callers of `Next`, each recording its history.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Calls completed so far, all callers together.
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Op>, Vec<String>)>>,
}

impl Load {
    /// `tasks` callers over `keys` keys of `namespace`, counts 1 to 3.
    pub fn start(
        client: std::sync::Arc<Client>,
        namespace: &'static str,
        keys: usize,
        tasks: usize,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..tasks)
            .map(|t| {
                let client = client.clone();
                let stop = stop.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let mut ops = Vec::new();
                    let mut errors = Vec::new();
                    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = format!("k{}", x % keys as u64);
                        let count = 1 + (x >> 32) as u32 % 3;
                        let invoked = Instant::now();
                        match client.next(namespace, &key, count).await {
                            Ok(r) => {
                                assert_eq!(r.count, count, "count echoed");
                                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                ops.push(Op {
                                    key,
                                    invoked,
                                    completed: Instant::now(),
                                    first: r.first,
                                    last: r.first + u64::from(r.count) - 1,
                                    epoch: r.epoch,
                                    replayed: r.replayed,
                                })
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    (ops, errors)
                })
            })
            .collect();
        Self { stop, done, tasks }
    }

    /// Waits until `calls` more calls have completed: the cluster serves.
    pub async fn progress(&self, calls: usize, within: Duration) {
        let target = self.done.load(std::sync::atomic::Ordering::Relaxed) + calls;
        let deadline = Instant::now() + within;
        while self.done.load(std::sync::atomic::Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "load made no progress ({calls} calls) within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the callers and returns every completed call and every error.
    pub async fn finish(self) -> (Vec<Op>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ops = Vec::new();
        let mut errors = Vec::new();
        for t in self.tasks {
            let (o, e) = t.await.expect("load task");
            ops.extend(o);
            errors.extend(e);
        }
        (ops, errors)
    }
}

/// The longest time, after `since`, during which no call completed.
pub fn longest_stall(ops: &[Op], since: Instant) -> Duration {
    let mut times: Vec<Instant> = ops
        .iter()
        .map(|o| o.completed)
        .filter(|t| *t >= since)
        .collect();
    times.sort();
    let mut prev = since;
    let mut worst = Duration::ZERO;
    for t in times {
        worst = worst.max(t - prev);
        prev = t;
    }
    worst
}

/// GET over plain HTTP/1.0 (no chunking), returning the body.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// The value of an unlabelled metric in a node's `/metrics` text.
pub fn metric(metrics_addr: &str, name: &str) -> Option<f64> {
    http_get(metrics_addr, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Evaluates a Prometheus instant query; the first sample's value, if any.
pub fn prom_query(addr: &str, q: &str) -> Option<f64> {
    let body = http_get(addr, &format!("/api/v1/query?query={}", encode(q)))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let sample = v["data"]["result"].get(0)?;
    sample["value"][1].as_str()?.parse().ok()
}

/// Waits until the Prometheus at `prom` has loaded every alerting rule of
/// `docker/seqd-rules.yml` and evaluated each without error (a rule over a
/// label or series shape the metrics do not have fails here).
pub fn wait_rules_evaluated(prom: &str, within: Duration) {
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/seqd-rules.yml"),
    )
    .expect("read docker/seqd-rules.yml");
    let expected = rules
        .lines()
        .filter(|l| l.trim().starts_with("- alert:"))
        .count();
    let deadline = Instant::now() + within;
    loop {
        let health = rule_health(prom);
        if matches!(&health, Some((n, bad)) if *n == expected && bad.is_empty()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus at {prom}: not all {expected} rules evaluated cleanly: {health:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The alerting rules the Prometheus at `prom` has loaded: how many, and
/// those not yet evaluated or whose last evaluation failed (with the error).
fn rule_health(prom: &str) -> Option<(usize, Vec<String>)> {
    let body = http_get(prom, "/api/v1/rules?type=alert")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut count = 0;
    let mut bad = Vec::new();
    for group in v["data"]["groups"].as_array()? {
        for rule in group["rules"].as_array()? {
            count += 1;
            if rule["health"] != "ok" {
                bad.push(format!(
                    "{}: {} {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    Some((count, bad))
}

/// Calls each of `keys` once, in one `NextBatch` of namespace `conv`.
pub async fn call_each_once(
    api: &mut seqd::pb::sequencer_client::SequencerClient<tonic::transport::Channel>,
    keys: impl Iterator<Item = String>,
) -> seqd::pb::NextBatchResponse {
    let items = keys
        .map(|key| seqd::pb::BatchItem { key, count: 1 })
        .collect();
    api.next_batch(seqd::pb::NextBatchRequest {
        namespace: "conv".into(),
        items,
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// One caller of `NextIds` per node address, each on its own node (every
/// node issues IDs), collecting every ID issued.
pub struct IdLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(u64, u64)>>>,
}

impl IdLoad {
    /// One caller per node in `addrs`, `count` IDs a call.
    pub fn start(addrs: Vec<String>, count: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = addrs
            .into_iter()
            .map(|addr| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                        .expect("endpoint")
                        .timeout(Duration::from_millis(500))
                        .connect_lazy();
                    let mut api = seqd::pb::ids_client::IdsClient::new(ch);
                    let mut ids = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match api.next_ids(seqd::pb::NextIdsRequest { count }).await {
                            Ok(r) => {
                                let r = r.into_inner();
                                ids.extend(r.ids.into_iter().map(|id| (r.worker, id)));
                            }
                            // A node under a fault: back off briefly.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    ids
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the callers; every ID issued, and how many were duplicates.
    /// Asserts that every node issued IDs, and that each node's IDs rose
    /// while its worker id stayed (I5: its timestamps never go back).
    pub async fn finish(self) -> (Vec<u64>, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ids = Vec::new();
        for (node, t) in self.tasks.into_iter().enumerate() {
            let issued = t.await.expect("id task");
            assert!(
                !issued.is_empty(),
                "the node at address {node} issued no ID"
            );
            for w in issued.windows(2) {
                let ((w0, a), (w1, b)) = (w[0], w[1]);
                assert!(
                    w0 != w1 || b > a,
                    "IDs of the node at address {node} (worker {w0}) went back: {a} then {b}"
                );
            }
            ids.extend(issued.into_iter().map(|(_, id)| id));
        }
        let unique: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let duplicates = ids.len() - unique.len();
        (ids, duplicates)
    }
}
