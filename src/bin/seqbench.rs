//! seqbench: drives a running seqd cluster with N concurrent callers for a
//! fixed time (or a call count, `--calls`) and prints calls/s, numbers/s
//! and latency percentiles. Keys are uniform here; `seqcompare` (bench/)
//! also draws them from a Zipf distribution and compares against Redis and
//! etcd.
//!
//! ```text
//! seqbench --endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 \
//!          --workload next --callers 32 --keys 10000 --seconds 10
//! ```
//!
//! Workloads: `next` (count 1), `next-count` (count = --count), `batch`
//! (NextBatch of --fanout keys), `ids` (NextIds of --count: through the
//! client, coalesced, from one node; with `--max-in-flight 0` one RPC per
//! call, the callers spread over every node).

// As in seqd and seqcompare: the client allocates per call, and glibc's
// malloc is a visible share of a load generator's CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use seqd::client::{Client, ClientOptions};
use seqd::pb::ids_client::IdsClient;
use seqd::pb::NextIdsRequest;
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Workload {
    Next,
    NextCount,
    Batch,
    Ids,
}

#[derive(Debug, Parser)]
#[command(name = "seqbench", version, about = "Load generator for seqd")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7000")]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "next")]
    workload: Workload,
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    callers: usize,
    /// Distinct keys, chosen uniformly (a `batch` call takes --fanout
    /// different ones of them).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Make this many calls (all callers together) instead of running for
    /// --seconds; throughput is over the time they took.
    #[arg(long)]
    calls: Option<u64>,
    /// Numbers per call (next-count, ids).
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// Keys per NextBatch call.
    #[arg(long, default_value_t = 50)]
    fanout: usize,
    #[arg(long, default_value = "conv")]
    namespace: String,
    /// Coalesced `Next` RPCs on the wire at once (the client's
    /// `max_in_flight`); 0 sends every call as its own RPC.
    #[arg(long, default_value_t = ClientOptions::default().max_in_flight)]
    max_in_flight: usize,
    /// Microseconds the newest coalesced RPC must have been out before
    /// another may start (the client's `rpc_spacing`).
    #[arg(long, default_value_t = ClientOptions::default().rpc_spacing.as_micros() as u64)]
    rpc_spacing_us: u64,
    /// Queued calls that go at once, whatever the spacing (the client's
    /// `rpc_fill`; 0: the spacing alone decides).
    #[arg(long, default_value_t = ClientOptions::default().rpc_fill)]
    rpc_fill: usize,
    /// Worker threads of this load generator's runtime (default: one per
    /// CPU). On a machine it shares with the nodes, fewer leave them cores
    /// of their own (as seqcompare --client-threads).
    #[arg(long)]
    client_threads: Option<usize>,
    /// Seconds the callers run before the measured window (their calls
    /// are not counted).
    #[arg(long, default_value_t = 1)]
    warmup_seconds: u64,
    /// Do not call every key once before the warm-up (its first call on a
    /// key raises a ceiling through the log, a one-time cost).
    #[arg(long)]
    no_prime: bool,
    /// Print JSON instead of a table row.
    #[arg(long)]
    json: bool,
}

/// What one caller measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    numbers: u64,
    errors: u64,
}

fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Key names written into buffers a caller keeps from call to call. The
/// generator shares the machine's cores with the nodes it measures, and a
/// `String` per key (with `format!`, and SipHash for the batch's repeat
/// check) was about 18 % of its CPU under `batch` (session 36's profile).
#[derive(Default)]
struct KeyNames {
    /// The names of the current call's keys, one after another.
    text: String,
    /// Where each name ends in `text`.
    ends: Vec<usize>,
    seen: foldhash::HashSet<u64>,
}

impl KeyNames {
    /// One of `k0`..`k{keys - 1}`, uniformly.
    fn one(&mut self, x: &mut u64, keys: u64) -> &str {
        self.text.clear();
        push_key_name(&mut self.text, next_rand(x) % keys);
        &self.text
    }

    /// `n` different keys of `k0`..`k{keys - 1}`, uniformly (a NextBatch
    /// refuses a key twice), each with count 1; repeats are drawn again.
    /// `n <= keys` (checked in `main`).
    fn distinct(&mut self, x: &mut u64, keys: u64, n: usize) -> Vec<(&str, u32)> {
        self.text.clear();
        self.ends.clear();
        self.seen.clear();
        while self.ends.len() < n {
            let k = next_rand(x) % keys;
            if self.seen.insert(k) {
                push_key_name(&mut self.text, k);
                self.ends.push(self.text.len());
            }
        }
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let name = &self.text[start..end];
                start = end;
                (name, 1)
            })
            .collect()
    }
}

fn push_key_name(out: &mut String, k: u64) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(out, "k{k}");
}

/// When a caller stops: at a time, or once the shared count of calls
/// started reaches a total.
enum Stop {
    At(Instant),
    After(Arc<AtomicU64>, u64),
}

impl Stop {
    /// Whether the caller may start another call (taking it from the count).
    fn go_on(&self) -> bool {
        match self {
            Stop::At(until) => Instant::now() < *until,
            Stop::After(started, total) => started.fetch_add(1, Ordering::Relaxed) < *total,
        }
    }

    /// Whether a call that has just completed counts: for a time, one that
    /// completed inside the window (the window's calls over its length, as
    /// seqcompare counts); for a count, every one.
    fn counts_now(&self) -> bool {
        match self {
            Stop::At(until) => Instant::now() <= *until,
            Stop::After(..) => true,
        }
    }
}

async fn caller(args: Arc<Args>, client: Arc<Client>, seed: u64, stop: Arc<Stop>) -> Tally {
    let mut t = Tally::default();
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
    let mut ids = match args.workload {
        Workload::Ids if args.max_in_flight == 0 => {
            let addr = &args.endpoints[seed as usize % args.endpoints.len()];
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .ok()
                .map(|e| e.tcp_nodelay(true).connect_lazy());
            ch.map(IdsClient::new)
        }
        _ => None,
    };
    let mut names = KeyNames::default();
    while stop.go_on() {
        let start = Instant::now();
        let result: Result<u64, String> = match args.workload {
            Workload::Next => client
                .next(&args.namespace, names.one(&mut x, args.keys), 1)
                .await
                .map(|_| 1)
                .map_err(|e| e.to_string()),
            Workload::NextCount => client
                .next(&args.namespace, names.one(&mut x, args.keys), args.count)
                .await
                .map(|r| u64::from(r.count))
                .map_err(|e| e.to_string()),
            Workload::Batch => {
                let items = names.distinct(&mut x, args.keys, args.fanout);
                client
                    .next_batch_ranges(&args.namespace, &items)
                    .await
                    .map(|r| r.ranges.len() as u64)
                    .map_err(|e| e.to_string())
            }
            Workload::Ids if args.max_in_flight > 0 => client
                .next_ids(args.count)
                .await
                .map(|r| r.ids.len() as u64)
                .map_err(|e| e.to_string()),
            Workload::Ids => match ids.as_mut() {
                Some(c) => c
                    .next_ids(NextIdsRequest { count: args.count })
                    .await
                    .map(|r| r.into_inner().ids.len() as u64)
                    .map_err(|s| s.message().to_string()),
                None => Err("bad endpoint".into()),
            },
        };
        if !stop.counts_now() {
            break;
        }
        match result {
            Ok(n) => {
                t.numbers += n;
                t.latencies_us
                    .push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(_) => t.errors += 1,
        }
    }
    t
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Calls every key of the namespace once, 1,000 keys a batch.
async fn prime(args: &Args, client: &Client) -> Result<(), String> {
    let names: Vec<String> = (0..args.keys).map(|k| format!("k{k}")).collect();
    for chunk in names.chunks(1_000) {
        let items: Vec<(&str, u32)> = chunk.iter().map(|k| (k.as_str(), 1)).collect();
        client
            .next_batch_ranges(&args.namespace, &items)
            .await
            .map_err(|e| format!("priming the keys failed: {e}"))?;
    }
    Ok(())
}

/// Runs `--callers` callers until `stop`; what they measured, together.
async fn run_callers(
    args: &Arc<Args>,
    client: &Arc<Client>,
    stop: &Arc<Stop>,
) -> Result<Tally, String> {
    let tasks: Vec<_> = (0..args.callers)
        .map(|i| {
            tokio::spawn(caller(
                args.clone(),
                client.clone(),
                i as u64 + 1,
                stop.clone(),
            ))
        })
        .collect();
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.map_err(|e| e.to_string())?;
        all.latencies_us.extend(t.latencies_us);
        all.numbers += t.numbers;
        all.errors += t.errors;
    }
    Ok(all)
}

async fn run(args: Args) -> Result<(), String> {
    let args = Arc::new(args);
    let client = Arc::new(
        Client::new(
            &args.endpoints,
            ClientOptions {
                max_in_flight: args.max_in_flight,
                rpc_spacing: Duration::from_micros(args.rpc_spacing_us),
                rpc_fill: args.rpc_fill,
                ..ClientOptions::default()
            },
        )
        .map_err(|e| e.to_string())?,
    );
    // Every key called once, so that no measured call pays a key's first
    // ceiling (until session 40 only eight other keys were called, and
    // every key's first call fell in the window).
    if !args.no_prime && !matches!(args.workload, Workload::Ids) {
        prime(&args, &client).await?;
    }
    // The same callers for the warm-up, their calls not counted.
    if args.warmup_seconds > 0 {
        let warm = Arc::new(Stop::At(
            Instant::now() + Duration::from_secs(args.warmup_seconds),
        ));
        run_callers(&args, &client, &warm).await?;
    }
    let started = Instant::now();
    let stop = Arc::new(match args.calls {
        Some(total) => Stop::After(Arc::new(AtomicU64::new(0)), total),
        None => Stop::At(started + Duration::from_secs(args.seconds)),
    });
    let mut all = run_callers(&args, &client, &stop).await?;
    let secs = match args.calls {
        Some(_) => started.elapsed().as_secs_f64(),
        None => args.seconds as f64,
    };
    all.latencies_us.sort_unstable();
    let calls = all.latencies_us.len();
    let row = json!({
        "workload": format!("{:?}", args.workload),
        "callers": args.callers,
        "keys": args.keys,
        "seconds": secs,
        "calls": calls,
        "errors": all.errors,
        "calls_per_s": calls as f64 / secs,
        "numbers_per_s": all.numbers as f64 / secs,
        "p50_ms": percentile(&all.latencies_us, 0.50),
        "p99_ms": percentile(&all.latencies_us, 0.99),
        "p999_ms": percentile(&all.latencies_us, 0.999),
        "max_ms": percentile(&all.latencies_us, 1.0),
    });
    if args.json {
        println!("{row}");
    } else {
        println!(
            "{:<10} callers={:<4} calls/s={:>10.0} numbers/s={:>11.0} p50={:>7.3}ms p99={:>7.3}ms p999={:>7.3}ms max={:>8.3}ms errors={}",
            row["workload"].as_str().unwrap_or(""),
            args.callers,
            row["calls_per_s"].as_f64().unwrap_or(0.0),
            row["numbers_per_s"].as_f64().unwrap_or(0.0),
            row["p50_ms"].as_f64().unwrap_or(0.0),
            row["p99_ms"].as_f64().unwrap_or(0.0),
            row["p999_ms"].as_f64().unwrap_or(0.0),
            row["max_ms"].as_f64().unwrap_or(0.0),
            all.errors
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.keys == 0 {
        eprintln!("seqbench: --keys must be at least 1");
        return ExitCode::from(2);
    }
    if matches!(args.workload, Workload::Batch) && args.fanout as u64 > args.keys {
        eprintln!(
            "seqbench: --fanout {} is more than --keys {}: a batch's keys must differ",
            args.fanout, args.keys
        );
        return ExitCode::from(2);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    match args.client_threads {
        Some(0) => {
            eprintln!("seqbench: --client-threads must be at least 1");
            return ExitCode::from(2);
        }
        Some(n) => {
            builder.worker_threads(n);
        }
        None => {}
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seqbench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seqbench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_different_keys_from_the_key_space() {
        let mut x = 0x9E37_79B9_7F4A_7C15;
        let mut names = KeyNames::default();
        let mut touched = std::collections::HashSet::new();
        for _ in 0..200 {
            let items = names.distinct(&mut x, 60, 50);
            let set: std::collections::HashSet<_> = items.iter().map(|(k, _)| *k).collect();
            assert_eq!(set.len(), 50, "{items:?}");
            for (k, count) in &items {
                assert_eq!(*count, 1);
                let i: u64 = k.strip_prefix('k').unwrap().parse().unwrap();
                assert!(i < 60, "{k} is outside 60 keys");
                touched.insert(i);
            }
        }
        assert_eq!(touched.len(), 60, "every key comes up");
    }

    #[test]
    fn a_single_key_is_one_of_the_key_space_and_replaces_the_last() {
        let mut x = 7;
        let mut names = KeyNames::default();
        let mut touched = std::collections::HashSet::new();
        for _ in 0..2_000 {
            let k = names.one(&mut x, 100).to_string();
            let i: u64 = k.strip_prefix('k').unwrap().parse().unwrap();
            assert!(i < 100, "{k}");
            touched.insert(i);
        }
        assert_eq!(touched.len(), 100, "every key comes up");
        // After a batch, a single key is just itself.
        names.distinct(&mut x, 100, 10);
        assert_eq!(names.one(&mut x, 1), "k0");
    }
}
