//! seqcompare: starts seqd (one node and three), Redis (no persistence and
//! fsync always) and etcd on loopback, each in a fresh temporary directory,
//! drives every one with the same callers, keys and workloads, and prints
//! one table row per (workload, target) with its durability and its
//! throughput relative to seqd measured in the same run. See README.md.

mod cli;
mod driver;
mod etcd_target;
mod keys;
mod ports;
mod process;
mod redis_target;
mod report;
mod seqd;
mod served;
mod stalls;
mod targets;

// The harness allocates per call (the client's batches, gRPC frames), as
// seqd does; mimalloc, as in seqd, and without huge pages for the same
// reason (first touches of 2 MiB pages stalled calls for milliseconds).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use serde_json::json;

use cli::{Args, Dist, Op, TargetKind};
use keys::{KeyDist, KeyPicker};
use process::{find_program, fs_type, version_line};
use report::{OpenLoopRow, Row, Status};
use targets::{Programs, Target};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("seqcompare: {e}");
        return ExitCode::from(2);
    }
    let programs = match resolve_programs(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("seqcompare: {e:#}");
            return ExitCode::from(2);
        }
    };
    let client_threads = args.client_threads(cpus());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seqcompare: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C or SIGTERM drops the run's future, and with it the guards that
    // kill every target process and remove its directory.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(&args, &programs) => r,
            s = shutdown_signal() => Err(anyhow!("{s}: targets stopped, no results written")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("seqcompare: some targets failed (see the notes above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("seqcompare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = term.recv() => "terminated",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "interrupted"
}

/// Finds the program of every selected target before anything starts, so a
/// missing one fails in a second rather than minutes into the run.
fn resolve_programs(args: &Args) -> Result<Programs> {
    let wants = |f: fn(TargetKind) -> bool| args.targets.iter().any(|t| f(*t));
    let seqd = if wants(TargetKind::is_seqd) {
        Some(find_program(
            &args.seqd_bin,
            "seqd binary",
            "run scripts/compare.sh (it builds the release binary), or pass --seqd-bin or set SEQD_BIN",
        )?)
    } else {
        None
    };
    let redis = if wants(|t| matches!(t, TargetKind::RedisNone | TargetKind::RedisAlways)) {
        Some(find_program(
            &args.redis_bin,
            "redis-server",
            "run scripts/compare.sh (it installs Debian's redis-server), or pass --redis-bin",
        )?)
    } else {
        None
    };
    let etcd = if wants(|t| t == TargetKind::Etcd) {
        Some(find_program(
            &args.etcd_bin,
            "etcd",
            "run scripts/compare.sh (it installs Debian's etcd-server), or pass --etcd-bin",
        )?)
    } else {
        None
    };
    Ok(Programs { seqd, redis, etcd })
}

/// Runs everything; Ok(false) when some target failed.
async fn run(args: &Args, programs: &Programs) -> Result<bool> {
    let base: PathBuf = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => std::env::temp_dir(),
    };
    let fs = fs_type(&base).unwrap_or_else(|| "unknown".into());
    if matches!(fs.as_str(), "tmpfs" | "ramfs") {
        eprintln!(
            "seqcompare: warning: {} is on {fs}: fsync costs nothing there, so the durable \
             rows do not show the cost of durability; pass --work-dir on a disk",
            base.display()
        );
    }
    let seqd_debug = programs
        .seqd
        .as_deref()
        .is_some_and(|p| p.components().any(|c| c.as_os_str() == "debug"));
    if let Some(seqd) = programs.seqd.as_deref().filter(|_| seqd_debug) {
        eprintln!(
            "seqcompare: warning: {} looks like a debug build; seqd's figures will be far \
             below a release build's",
            seqd.display()
        );
    }

    let dist = match args.dist {
        Dist::Uniform => KeyDist::uniform(args.keys),
        Dist::Zipf => KeyDist::zipf(args.keys, args.zipf_s),
    };
    let runs: usize = args.targets.iter().map(|t| runs_of(args, *t).0).sum();
    let peak_runs: usize = args.targets.iter().map(|t| runs_of(args, *t).1).sum();
    let open_run = open_run_seconds(args);
    let runs = runs + peak_runs;
    match args.calls {
        Some(calls) => eprintln!(
            "seqcompare: {} x {runs} runs of {} s + {calls} calls ({} callers, {} keys, {}; {peak_runs} of them peak runs of {} s)",
            args.rounds,
            args.warmup_seconds,
            args.callers,
            args.keys,
            dist_name(args),
            args.peak_seconds,
        ),
        None => eprintln!(
            "seqcompare: {} x {runs} runs, {} of {}+{} s{} at {} callers and {peak_runs} peak runs of {}+{} s ({} keys, {}); about {} s plus target start-up",
            args.rounds,
            runs - peak_runs,
            args.warmup_seconds,
            args.seconds,
            if open_run > 0 {
                format!(" (then {open_run} s open loop)")
            } else {
                String::new()
            },
            args.callers,
            args.warmup_seconds,
            args.peak_seconds,
            args.keys,
            dist_name(args),
            planned_seconds(args)
        ),
    }

    let started = Instant::now();
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("seqcompare: round {round} of {}", args.rounds);
        }
        // Every other round runs the targets in reverse, so that a machine
        // that speeds up or slows down over a round favours none of them.
        let mut order = args.targets.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        rounds.push(run_round(args, &order, programs, &base, &dist, runs).await);
    }

    // Rows grouped by workload in the order asked for, targets in order.
    let order = |r: &Row| {
        let w = args.workloads.iter().position(|w| w.name() == r.workload);
        let t = args.targets.iter().position(|t| t.name() == r.target);
        (w, t)
    };
    for round in &mut rounds {
        round.sort_by_key(order);
    }
    // A target that died in any round fails the run, even where other
    // rounds measured its rows.
    let all_ran = rounds.iter().flatten().all(|r| r.status != Status::Failed);
    let all_rows = report::combine_rounds(&mut rounds);
    let per_round = (args.rounds > 1).then_some(rounds);
    let (rows, peak_rows): (Vec<Row>, Vec<Row>) = all_rows
        .into_iter()
        .partition(|r| r.callers == args.callers);

    println!();
    println!(
        "seqcompare: {} callers, {} keys ({}), count {}, fanout {}, namespace {:?}, {} measured after {} s warm-up, {} connection(s) per node, seqd client max_in_flight {}, harness runtime {} worker thread(s)",
        args.callers,
        args.keys,
        dist_name(args),
        args.count,
        args.fanout,
        args.namespace,
        match args.calls {
            Some(calls) => format!("{calls} calls"),
            None => format!("{} s", args.seconds),
        },
        args.warmup_seconds,
        args.connections,
        args.max_in_flight,
        args.client_threads(cpus())
    );
    println!("latency: per call, from send to reply; ratios: calls/s over seqd's, same workload, same run");
    if args.rounds > 1 {
        println!(
            "rounds: {}, each target started afresh in each; a row is the round with the median calls/s, \
             its ratios the median of the rounds' own; \"rounds:\" columns: lowest-highest over the rounds",
            args.rounds
        );
    }
    let versions = [
        ("seqd", programs.seqd.as_deref()),
        ("redis", programs.redis.as_deref()),
        ("etcd", programs.etcd.as_deref()),
    ]
    .map(|(name, p)| p.map(|p| (name, p, version_line(p))));
    for (name, path, version) in versions.iter().flatten() {
        let debug = if *name == "seqd" && seqd_debug {
            " (DEBUG BUILD: not representative)"
        } else {
            ""
        };
        println!("{name}: {} ({version}){debug}", path.display());
    }
    println!();
    print!("{}", report::table(&rows));
    let open = report::open_loop_table(&rows);
    if !open.is_empty() {
        println!();
        let due = match args.open_loop_rate {
            Some(rate) => format!("{rate:.0} calls/s for every row"),
            None => format!(
                "{:.0}% of each row's calls/s above",
                args.open_loop_fraction * 100.0
            ),
        };
        println!(
            "open loop: calls due at {due}, {} s after {} s warm-up, \
             up to {} in flight; latency from when a call was due, the harness's lateness \
             and waiting for a free caller included (\"behind\": calls that found every caller \
             busy; \"sent late\": the harness's own lateness against the schedule, its share \
             of the latency; \"cpu\": the \
             target's processes' CPU per call and cores in use, the harness's cores; \"node\": \
             seqd's own request histogram over the window, per RPC or stream batch (many calls), \
             from the decoded request to the answer, read round included, HTTP/2 and sockets \
             not: the upper bounds of the buckets holding its p99 and p999; \"machine stall\": \
             the latest a real-time thread of the harness woke from a 1 ms sleep in the window: \
             its CPU ran nothing else that long, and calls on that CPU waited with it)",
            args.open_loop_seconds,
            OPEN_LOOP_WARMUP.as_secs(),
            args.open_loop_callers
        );
        println!();
        print!("{open}");
    }
    let mut points = args.peak_points();
    points.push(args.callers);
    points.sort_unstable();
    let both: Vec<Row> = rows.iter().chain(&peak_rows).cloned().collect();
    let peak = report::peak_table(&both, &points);
    if !peak.is_empty() {
        println!();
        println!(
            "peak: closed loop at each number of callers ({} s after {} s warm-up; the --callers column is the table above); \
             a target's peak is its highest calls/s, \"vs\": that peak over seqd's",
            args.peak_seconds, args.warmup_seconds
        );
        println!();
        print!("{peak}");
    }

    let doc = json!({
        "tool": "seqcompare",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "wall_seconds": started.elapsed().as_secs_f64(),
        "settings": {
            "callers": args.callers,
            "seconds": args.seconds,
            "calls": args.calls,
            "warmup_seconds": args.warmup_seconds,
            "keys": args.keys,
            "dist": match args.dist { Dist::Uniform => "uniform", Dist::Zipf => "zipf" },
            "zipf_s": args.zipf_s,
            "count": args.count,
            "fanout": args.fanout,
            "namespace": args.namespace,
            "connections": args.connections,
            "max_in_flight": args.max_in_flight,
            "rpc_spacing_us": args.rpc_spacing_us,
            "rpc_fill": args.rpc_fill,
            "client_threads": args.client_threads(cpus()),
            "rounds": args.rounds,
            "seed": args.seed,
            "open_loop_fraction": args.open_loop_fraction,
            "open_loop_rate": args.open_loop_rate,
            "primed": !args.no_prime,
            "open_loop_seconds": args.open_loop_seconds,
            "open_loop_callers": args.open_loop_callers,
            "open_loop_warmup_seconds": OPEN_LOOP_WARMUP.as_secs(),
            "peak_callers": args.peak_points(),
            "peak_workloads": args.peak_workloads.iter().filter(|w| args.peak_workload(**w)).map(|w| w.name()).collect::<Vec<_>>(),
            "peak_targets": args.targets.iter().filter(|t| args.peak_target(**t)).map(|t| t.name()).collect::<Vec<_>>(),
            "peak_seconds": args.peak_seconds,
        },
        "programs": {
            "seqd": versions[0].as_ref().map(|(_, p, v)| json!({"path": p, "version": v, "debug_build": seqd_debug})),
            "redis": versions[1].as_ref().map(|(_, p, v)| json!({"path": p, "version": v})),
            "etcd": versions[2].as_ref().map(|(_, p, v)| json!({"path": p, "version": v})),
        },
        "machine": {
            "cpus": cpus(),
            "work_dir": base,
            "work_dir_fs": fs,
        },
        "rows": rows,
        "peak_rows": peak_rows,
        "round_rows": per_round,
    });
    write_json(&args.json, &doc)?;
    println!(
        "\nresults written to {} ({:.0} s in all)",
        args.json.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(all_ran)
}

/// One round: each of `targets` in turn, started afresh, primed and run
/// through every workload; its rows in the order measured. `runs` is the
/// round's count of measured rows, for the progress lines.
async fn run_round(
    args: &Args,
    targets: &[TargetKind],
    programs: &Programs,
    base: &Path,
    dist: &KeyDist,
    runs: usize,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut done = 0;
    for &kind in targets {
        let applicable: Vec<_> = args
            .workloads
            .iter()
            .copied()
            .filter(|w| Target::unsupported(kind, *w).is_none())
            .collect();
        for &w in &args.workloads {
            if let Some(why) = Target::unsupported(kind, w) {
                rows.push(Row::not_applicable(w, kind, why).at(args.callers));
            }
        }
        if applicable.is_empty() {
            continue;
        }
        let peak_runs = applicable
            .iter()
            .filter(|w| args.peak_target(kind) && args.peak_workload(**w))
            .flat_map(|&w| {
                let points = args.peak_points();
                let last = points.last().copied();
                points
                    .into_iter()
                    .map(move |c| (w, RunShape::peak(args, c, Some(c) == last)))
            });
        let runs_here: Vec<_> = applicable
            .iter()
            .map(|&w| (w, RunShape::main(args)))
            .chain(peak_runs)
            .collect();
        eprintln!("seqcompare: starting {kind}");
        let mut target = match Target::start(kind, args, programs, base).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("seqcompare: {kind} failed to start: {e:#}");
                for (w, shape) in &runs_here {
                    let why = format!("failed to start: {e:#}");
                    rows.push(Row::failed(*w, kind, why).at(shape.callers));
                }
                done += runs_here.len();
                continue;
            }
        };
        if !args.no_prime && applicable.iter().any(|w| *w != cli::Workload::Ids) {
            if let Err(e) = prime(&mut target, args).await {
                eprintln!("seqcompare: priming {kind} failed: {e:#}");
            }
        }
        // Each workload's highest calls/s on this target so far this
        // round: the last peak point's open-loop run offers half of it.
        let mut peak_so_far: Vec<(cli::Workload, f64)> = Vec::new();
        for (w, shape) in runs_here {
            done += 1;
            let peak = peak_so_far
                .iter()
                .find(|(pw, _)| *pw == w)
                .map_or(0.0, |(_, p)| *p);
            let at = if shape.callers == args.callers {
                String::new()
            } else {
                format!(" at {} callers", shape.callers)
            };
            match measure_one(kind, &mut target, args, w, dist, shape, peak).await {
                Ok(row) => {
                    match peak_so_far.iter_mut().find(|(pw, _)| *pw == w) {
                        Some((_, p)) => *p = p.max(row.calls_per_s),
                        None => peak_so_far.push((w, row.calls_per_s)),
                    }
                    let open = row.open_loop.as_ref().map_or_else(String::new, |o| {
                        format!(
                            "; open loop at {:.0}/s: p99 {:.3} ms, p999 {:.3} ms",
                            o.offered_per_s, o.p99_ms, o.p999_ms
                        )
                    });
                    eprintln!(
                        "[{done}/{runs}] {w:<10} {kind:<12} {:>12.0} calls/s  p99 {:.3} ms  errors {}{open}{at}",
                        row.calls_per_s, row.p99_ms, row.errors
                    );
                    rows.push(row);
                }
                Err(e) => {
                    eprintln!("[{done}/{runs}] {w} on {kind}{at} failed: {e:#}");
                    rows.push(Row::failed(w, kind, format!("{e:#}")).at(shape.callers));
                }
            }
        }
        // Stop this target before the next starts: they share two cores.
        drop(target);
    }

    rows
}

/// Seconds of the open-loop run after each --callers row (0: none).
fn open_run_seconds(args: &Args) -> u64 {
    if args.open_loop() {
        OPEN_LOOP_WARMUP.as_secs() + args.open_loop_seconds
    } else {
        0
    }
}

/// How long the runs of a whole comparison take, for --seconds (with
/// --calls a row's length is its calls'); target start-up and priming
/// come on top, about 15 s a round by default.
fn planned_seconds(args: &Args) -> u64 {
    let (runs, peak_runs) = args
        .targets
        .iter()
        .map(|t| runs_of(args, *t))
        .fold((0, 0), |(a, b), (r, p)| (a + r as u64, b + p as u64));
    let row = args.warmup_seconds + args.seconds + open_run_seconds(args);
    // The last point of each peak series has an open-loop run too.
    let series = peak_runs / args.peak_points().len().max(1) as u64;
    args.rounds as u64
        * (runs * row
            + peak_runs * (args.warmup_seconds + args.peak_seconds)
            + series * open_run_seconds(args))
}

/// The measured runs `kind` takes in a round: (at --callers, peak runs).
fn runs_of(args: &Args, kind: TargetKind) -> (usize, usize) {
    let applicable: Vec<_> = args
        .workloads
        .iter()
        .filter(|w| Target::unsupported(kind, **w).is_none())
        .collect();
    let peak = applicable
        .iter()
        .filter(|w| args.peak_target(kind) && args.peak_workload(***w))
        .count()
        * args.peak_points().len();
    (applicable.len(), peak)
}

/// The machine's CPUs (0 where the OS cannot tell).
fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// "uniform" or "zipf s=1", for the headers.
fn dist_name(args: &Args) -> String {
    match args.dist {
        Dist::Uniform => "uniform".into(),
        Dist::Zipf => format!("zipf s={}", args.zipf_s),
    }
}

/// Calls every key once before the first measurement, so that every
/// target starts warm: seqd has loaded each key and holds a segment for
/// it (a key's first call waits for a ceiling raised through the log), Redis
/// and etcd have created it. Without this, keys first touched inside the
/// measured window charge that one-time cost to whichever workload runs
/// first.
async fn prime(target: &mut Target, args: &Args) -> Result<()> {
    let started = Instant::now();
    target
        .prepare(Duration::from_secs(args.start_timeout))
        .await?;
    let n = args.callers as u64;
    let pickers = (0..n)
        .map(|first| {
            let dist = KeyDist::Stride {
                keys: args.keys,
                first,
                step: n,
            };
            KeyPicker::new(dist, 0)
        })
        .collect();
    let callers = target
        .callers(Op::Next { count: 1 }, args, pickers)
        .await
        .context("cannot connect the priming callers")?;
    driver::run_calls(callers, args.keys.div_ceil(n))
        .await
        .map_err(|e| anyhow!("priming call failed: {e}"))?;
    eprintln!(
        "seqcompare: primed {} keys in {:.1} s",
        args.keys,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How one closed-loop run is shaped: the main rows' (`--callers`, then
/// an open-loop run) or a peak run's.
#[derive(Clone, Copy)]
struct RunShape {
    callers: usize,
    seconds: u64,
    /// A call count instead of `seconds` (`--calls`).
    calls: Option<u64>,
    open_loop: bool,
    /// How many calls its open-loop run may have in flight.
    open_loop_callers: usize,
}

impl RunShape {
    fn main(args: &Args) -> Self {
        Self {
            callers: args.callers,
            seconds: args.seconds,
            calls: args.calls,
            open_loop: args.open_loop(),
            open_loop_callers: args.open_loop_callers,
        }
    }

    /// A peak run; the `last` point of a series runs open loop at half
    /// (`--open-loop-fraction`) of the series' highest calls/s after it:
    /// DESIGN.md's "at half of peak load". With twice its callers in
    /// flight at most: half of a peak reached with N callers, offered to
    /// N / 2 of them, asks each for the peak's own latency (Little's law),
    /// and the first such run (256 callers after 512) queued in the
    /// harness, 10-80 % of calls finding every caller busy.
    fn peak(args: &Args, callers: usize, last: bool) -> Self {
        Self {
            callers,
            seconds: args.peak_seconds,
            calls: None,
            open_loop: last && args.open_loop(),
            open_loop_callers: args.open_loop_callers.max(2 * callers),
        }
    }
}

/// One (target, workload) measurement, shaped by `shape`; its open-loop
/// run offers a fraction of the higher of this run's calls/s and
/// `peak_so_far` (the workload's best on this target this round).
async fn measure_one(
    kind: TargetKind,
    target: &mut Target,
    args: &Args,
    workload: cli::Workload,
    dist: &KeyDist,
    shape: RunShape,
    peak_so_far: f64,
) -> Result<Row> {
    target.check_alive()?;
    target
        .prepare(Duration::from_secs(args.start_timeout))
        .await?;
    let callers = target
        .callers(
            Op::of(workload, args),
            args,
            pickers(shape.callers, args, dist),
        )
        .await
        .context("cannot connect the callers")?;
    let (warmup, seconds) = (
        Duration::from_secs(args.warmup_seconds),
        Duration::from_secs(shape.seconds),
    );
    // The machine's own stalls over the window (not measured for a call
    // count, whose window ends when the calls do).
    let mut machine = None;
    let (m, cpu) = match shape.calls {
        Some(total) => {
            process::cpu_during(
                target.pids(),
                warmup,
                driver::drive_count(callers, warmup, total),
            )
            .await
        }
        None => {
            let (m, cpu, stalls) = tokio::join!(
                driver::drive(callers, warmup, seconds),
                process::cpu_over(target.pids(), warmup, seconds),
                stalls::over(warmup, seconds)
            );
            machine = stalls;
            (m, cpu)
        }
    };
    target.check_alive()?;
    let mut row = Row::measured(workload, kind, m, cpu).at(shape.callers);
    row.machine_stalls = machine;
    if shape.open_loop && row.calls_per_s > 0.0 {
        let rate = args
            .open_loop_rate
            .unwrap_or(args.open_loop_fraction * row.calls_per_s.max(peak_so_far));
        let callers = target
            .callers(
                Op::of(workload, args),
                args,
                pickers(shape.open_loop_callers, args, dist),
            )
            .await
            .context("cannot connect the open-loop callers")?;
        let seconds = Duration::from_secs(args.open_loop_seconds);
        // The node's own histogram over the measured window: its share of
        // the tail, apart from the harness's.
        let t0 = tokio::time::Instant::now();
        let served = async {
            tokio::time::sleep_until(t0 + OPEN_LOOP_WARMUP).await;
            let before = target.served().await?;
            tokio::time::sleep_until(t0 + OPEN_LOOP_WARMUP + seconds).await;
            let after = target.served().await?;
            Some(before.zip(after).map(|(b, a)| a.since(&b)))
        };
        let (o, cpu, served, stalls) = tokio::join!(
            driver::drive_open(callers, rate, OPEN_LOOP_WARMUP, seconds),
            process::cpu_over(target.pids(), OPEN_LOOP_WARMUP, seconds),
            served,
            stalls::over(OPEN_LOOP_WARMUP, seconds)
        );
        target.check_alive()?;
        let mut open = OpenLoopRow::new(rate / row.calls_per_s, o, cpu);
        open.set_served(served);
        open.machine_stalls = stalls;
        row.open_loop = Some(open);
    }
    Ok(row)
}

/// Warm-up of an open-loop run (the target is already warm from the closed
/// run before it).
const OPEN_LOOP_WARMUP: Duration = Duration::from_secs(1);

/// One key picker for each of `n` callers; caller i gets seed + i on every
/// target, so all see the same keys.
fn pickers(n: usize, args: &Args, dist: &KeyDist) -> Vec<KeyPicker> {
    (0..n)
        .map(|i| KeyPicker::new(dist.clone(), args.seed.wrapping_add(i as u64)))
        .collect()
}

fn write_json(path: &Path, doc: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(doc)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Issue 7: the comparison runs on a fresh machine within ten minutes.
    /// There, the setup's packages and the crates take about a minute and
    /// the cold release build five (4 min 56 s and 5 min 12 s on session
    /// 34's VM; the whole comparison took 6.4 min on session 38's), which
    /// leaves the default run about three and a half minutes (215 s since
    /// session 40 added the open-loop runs at half of peak), target
    /// start-up included.
    #[test]
    fn the_default_comparison_fits_beside_a_cold_build_in_ten_minutes() {
        let default = Args::try_parse_from(["seqcompare"]).unwrap();
        let planned = planned_seconds(&default);
        // Each target's start-up and priming: about 3 s (etcd's priming).
        let start_up = 3 * default.targets.len() as u64;
        assert!(
            planned + start_up <= 215,
            "the default runs take {planned} s, and start-up about {start_up} s more"
        );
        // The README's table's run: 25 rows of 1 + 5 + 1 + 3 s, 10 peak
        // runs of 1 + 3 s, and 5 open-loop runs at half of peak of 1 + 3 s.
        let table = Args::try_parse_from([
            "seqcompare",
            "--seconds",
            "5",
            "--open-loop-seconds",
            "3",
            "--peak-seconds",
            "3",
            "--targets",
            "seqd-1node,seqd-3node,seqd-3node-raw,seqd-3node-lease,redis-none,redis-always,etcd",
        ])
        .unwrap();
        assert_eq!(planned_seconds(&table), 25 * 10 + 10 * 4 + 5 * 4);
    }
}
