//! seqctl: the operator's CLI for a seqd cluster.
//!
//! `seqctl status` shows every node; `add-node`, `remove-node` and
//! `transfer-leader` go to the leader, found through the nodes' status.
//! Tables by default, `--json` for scripts; errors are one line on stderr
//! and a non-zero exit.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use seqd::pb::admin_client::AdminClient;
use seqd::pb::{
    AddNodeRequest, HandoverProgress, RemoveNodeRequest, StatusRequest, StatusResponse,
    TransferLeaderRequest,
};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Parser)]
#[command(name = "seqctl", version, about = "Operate a seqd cluster")]
struct Cli {
    /// The cluster's nodes, host:port, comma-separated.
    #[arg(
        long,
        env = "SEQCTL_ENDPOINTS",
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        value_delimiter = ','
    )]
    endpoints: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The cluster's shared secret (node.secret), which changes
    /// (add-node, remove-node, transfer-leader) must carry when the nodes
    /// are configured with one.
    #[arg(long, global = true, env = "SEQD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Members, leader, term, commit/applied index and lag of every node.
    Status,
    /// Add a node as a learner, or with --voter add or promote it to voter.
    /// Start the node with --join first.
    AddNode {
        #[arg(long)]
        id: u64,
        /// host:port the cluster reaches the node at.
        #[arg(long)]
        addr: String,
        #[arg(long)]
        voter: bool,
    },
    /// Remove a node; its Snowflake worker id is freed.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Exit 0 if the first endpoint's gRPC health is SERVING (for container
    /// healthchecks).
    Health,
    /// Move leadership (after committing every key's exact position).
    /// Waits for as long as the leader's handover goes on: the leader gives
    /// up by itself once it stops making progress.
    TransferLeader {
        /// Target node id; the most caught-up follower when omitted.
        #[arg(long)]
        to: Option<u64>,
        /// Print the handover's progress on stderr every N seconds (0: never).
        #[arg(long, default_value_t = 5)]
        progress_secs: u64,
        /// Stop waiting after N seconds (0: wait while the handover goes on).
        /// The handover itself goes on.
        #[arg(long, default_value_t = 0)]
        timeout_secs: u64,
    },
}

/// HTTP/2 pings while `transfer-leader` waits: a leader that stops
/// answering them (its machine gone or frozen) ends the wait.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

fn admin(addr: &str) -> Result<AdminClient<Channel>, String> {
    let ch = endpoint(addr)?
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(AdminClient::new(ch))
}

/// An admin client for a call that waits for as long as the node works on
/// it, while the node answers HTTP/2 pings.
fn admin_kept_alive(addr: &str) -> Result<AdminClient<Channel>, String> {
    let ch = endpoint(addr)?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(AdminClient::new(ch))
}

fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| format!("bad endpoint {addr:?}"))?
        .connect_timeout(Duration::from_secs(1)))
}

/// One line of a handover's progress, as `transfer-leader` prints it.
fn progress_line(h: &HandoverProgress) -> String {
    let secs = h.elapsed_ms as f64 / 1000.0;
    match h.phase.as_str() {
        "releasing" => format!(
            "handover {secs:.0} s: releasing idle keys (serving), {} released, {} of {} keys \
             looked at",
            h.keys_released, h.keys_looked_at, h.keys_at_start
        ),
        "trimming" => format!(
            "handover {secs:.0} s: trimming (not serving), {} of {} keys proposed",
            h.trim_keys - h.trim_keys_left.min(h.trim_keys),
            h.trim_keys
        ),
        phase => format!("handover {secs:.0} s: {phase}"),
    }
}

/// `message` as a request carrying the cluster's secret, if given.
fn signed<T>(message: T, secret: Option<&str>) -> Result<tonic::Request<T>, String> {
    let mut request = tonic::Request::new(message);
    if let Some(secret) = secret {
        let value = secret
            .parse()
            .map_err(|_| "--secret: only visible ASCII characters".to_string())?;
        request
            .metadata_mut()
            .insert(seqd::service::SECRET_HEADER, value);
    }
    Ok(request)
}

/// Waits for the leader's handover, printing its progress every `every`
/// (never if zero), for at most `timeout` (if not zero).
async fn transfer_leader(
    leader: &str,
    to: Option<u64>,
    every: Duration,
    timeout: Duration,
    secret: Option<&str>,
) -> Result<(), String> {
    let mut admin = admin_kept_alive(leader)?;
    let call = admin.transfer_leader(signed(
        TransferLeaderRequest {
            to: to.unwrap_or(0),
        },
        secret,
    )?);
    tokio::pin!(call);
    let started = tokio::time::Instant::now();
    // Zero is never; a century is as good as never, and longer would come
    // near the clock's end, where tokio's timer overflows.
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    let after = |d: Duration| {
        (!d.is_zero())
            .then(|| started.checked_add(d.min(century)))
            .flatten()
    };
    let deadline = after(timeout);
    let mut tick = after(every).map(|first| tokio::time::interval_at(first, every));
    loop {
        let give_up = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending::<()>().await,
            }
        };
        let progress = async {
            match tick.as_mut() {
                Some(tick) => tick.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = &mut call => return done.map(|_| ()).map_err(|s| s.message().to_string()),
            _ = give_up => {
                return Err(format!(
                    "stopped waiting after {} s; the handover goes on (seqctl status shows it)",
                    timeout.as_secs()
                ))
            }
            _ = progress => {
                if let Ok(s) = status_of(leader).await {
                    if let Some(h) = s.handover {
                        eprintln!("{}", progress_line(&h));
                    }
                }
            }
        }
    }
}

async fn status_of(addr: &str) -> Result<StatusResponse, String> {
    let mut c = admin(addr)?;
    let call = c.status(StatusRequest {});
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

async fn statuses(endpoints: &[String]) -> Vec<(String, Result<StatusResponse, String>)> {
    let mut out = Vec::new();
    for e in endpoints {
        out.push((e.clone(), status_of(e).await));
    }
    out
}

/// The endpoint of the node that reports itself leader.
/// Otherwise the error names each endpoint that did not answer, and why
/// (a malformed endpoint is told apart from a node that is down).
async fn leader(endpoints: &[String]) -> Result<String, String> {
    let mut unanswered = Vec::new();
    for (addr, s) in statuses(endpoints).await {
        match s {
            Ok(s) if s.role == "Leader" => return Ok(addr),
            Ok(_) => {}
            // One line, as every seqctl error.
            Err(e) => unanswered.push(format!("{addr}: {}", e.replace('\n', " "))),
        }
    }
    let mut msg = format!("no leader among {}; is a majority up?", endpoints.join(","));
    if !unanswered.is_empty() {
        msg.push_str(&format!(" ({})", unanswered.join("; ")));
    }
    Err(msg)
}

fn print_status(rows: &[(String, Result<StatusResponse, String>)], as_json: bool) {
    let max_commit = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok().map(|s| s.commit_index))
        .max()
        .unwrap_or(0);
    if as_json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(addr, s)| match s {
                Ok(s) => json!({
                    "endpoint": addr, "id": s.id, "role": s.role, "term": s.term,
                    "leader_id": s.leader_id, "commit_index": s.commit_index,
                    "applied_index": s.applied_index,
                    "lag": max_commit.saturating_sub(s.applied_index),
                    "voters": s.voters, "learners": s.learners, "epoch": s.epoch,
                    "serving": s.serving, "worker": s.has_worker.then_some(s.worker),
                    "ids_active": s.ids_active, "answering": s.answering,
                    "peer_clocks_ms": s.peer_clocks.iter()
                        .map(|p| (p.node_id.to_string(), json!(p.offset_ms)))
                        .collect::<serde_json::Map<String, serde_json::Value>>(),
                    "ahead_of_cluster_ms": s.ahead_of_cluster_ms,
                    "handover": s.handover.as_ref().map(|h| json!({
                        "phase": h.phase, "elapsed_ms": h.elapsed_ms,
                        "keys_at_start": h.keys_at_start,
                        "keys_looked_at": h.keys_looked_at,
                        "keys_released": h.keys_released,
                        "trim_keys": h.trim_keys, "trim_keys_left": h.trim_keys_left,
                    })),
                }),
                Err(e) => json!({ "endpoint": addr, "error": e }),
            })
            .collect();
        println!("{}", json!({ "nodes": nodes }));
        return;
    }
    // Each node's clock against the leader's, as the leader estimates it
    // from the node's Raft frames.
    let leader = rows
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .find(|s| s.role == "Leader");
    let clock = |id: u64| match leader {
        Some(l) if l.id == id => "0.0s".to_string(),
        Some(l) => l
            .peer_clocks
            .iter()
            .find(|p| p.node_id == id)
            .map_or("-".into(), |p| {
                format!("{:+.1}s", p.offset_ms as f64 / 1000.0)
            }),
        None => "-".into(),
    };
    println!(
        "{:<22} {:>4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>6} {:>6} {:>7}  MEMBERS",
        "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "LAG", "WORKER", "CLOCK"
    );
    for (addr, s) in rows {
        match s {
            Ok(s) => println!(
                "{:<22} {:>4} {:<10} {:>6} {:>6} {:>10} {:>10} {:>6} {:>6} {:>7}  voters={:?} learners={:?}",
                addr,
                s.id,
                s.role,
                s.term,
                s.leader_id,
                s.commit_index,
                s.applied_index,
                max_commit.saturating_sub(s.applied_index),
                if s.has_worker { s.worker.to_string() } else { "-".into() },
                clock(s.id),
                s.voters,
                s.learners
            ),
            Err(e) => println!("{addr:<22} unreachable: {e}"),
        }
    }
    for s in rows.iter().filter_map(|(_, s)| s.as_ref().ok()) {
        if s.ahead_of_cluster_ms > 0 {
            println!(
                "node {}: its clock runs {:.1} s past the other nodes' time fences: it issues no IDs until the clocks agree",
                s.id,
                s.ahead_of_cluster_ms as f64 / 1000.0
            );
        }
    }
    for (_, s) in rows {
        if let Some(h) = s.as_ref().ok().and_then(|s| s.handover.as_ref()) {
            println!(
                "node {}: {}",
                s.as_ref().map_or(0, |s| s.id),
                progress_line(h)
            );
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    if cli.endpoints.is_empty() {
        return Err("--endpoints: no endpoint given".into());
    }
    match cli.cmd {
        Cmd::Status => {
            let rows = statuses(&cli.endpoints).await;
            print_status(&rows, cli.json);
            if rows.iter().all(|(_, s)| s.is_err()) {
                return Err("no node answered".into());
            }
        }
        Cmd::Health => {
            let addr = cli
                .endpoints
                .first()
                .ok_or("--endpoints: no endpoint given")?;
            let ch = endpoint(addr)?
                .timeout(Duration::from_secs(2))
                .connect_lazy();
            let status = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| format!("{addr}: {}", s.message()))?
                .into_inner()
                .status;
            let serving = status == ServingStatus::Serving as i32;
            println!(
                "{addr}: {}",
                if serving { "SERVING" } else { "NOT_SERVING" }
            );
            if !serving {
                return Err(format!("{addr} is not serving"));
            }
        }
        Cmd::AddNode { id, addr, voter } => {
            let leader = leader(&cli.endpoints).await?;
            let m = admin(&leader)?
                .add_node(signed(
                    AddNodeRequest { id, addr, voter },
                    cli.secret.as_deref(),
                )?)
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            report(cli.json, &m.voters, &m.learners);
        }
        Cmd::RemoveNode { id } => {
            let leader = leader(&cli.endpoints).await?;
            let m = admin(&leader)?
                .remove_node(signed(RemoveNodeRequest { id }, cli.secret.as_deref())?)
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            report(cli.json, &m.voters, &m.learners);
        }
        Cmd::TransferLeader {
            to,
            progress_secs,
            timeout_secs,
        } => {
            let leader = leader(&cli.endpoints).await?;
            // The leader first releases the keys not in use and trims the
            // rest: about 25 s per million keys on a 2-core VM, so no fixed
            // wait fits every cluster.
            transfer_leader(
                &leader,
                to,
                Duration::from_secs(progress_secs),
                Duration::from_secs(timeout_secs),
                cli.secret.as_deref(),
            )
            .await?;
            if cli.json {
                println!("{}", json!({ "transferred_from": leader }));
            } else {
                println!("leadership moved away from {leader}");
            }
        }
    }
    Ok(())
}

fn report(as_json: bool, voters: &[u64], learners: &[u64]) {
    if as_json {
        println!("{}", json!({ "voters": voters, "learners": learners }));
    } else {
        println!("voters={voters:?} learners={learners:?}");
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // `a:1, b:2`, as people write lists, is two endpoints.
    cli.endpoints = cli
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seqctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seqctl: {e}");
            ExitCode::FAILURE
        }
    }
}
