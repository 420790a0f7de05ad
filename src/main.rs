//! The seqd server: parse flags, set up logging, run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::BoolishValueParser;
use clap::Parser;
use seqd::config::{Config, Overrides};

// Every call allocates and frees a few small buffers (decoded keys, replies),
// often on different worker threads; glibc's malloc took 8 % of the node's
// CPU on `Next` and more on `NextBatch`, mimalloc a fraction of that.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Raft-replicated sequence and ID allocator.
///
/// Without --config, runs a single node from the embedded
/// raft-config/single.toml (data in ./seqd-data, gRPC on 127.0.0.1:7000).
#[derive(Debug, Parser)]
#[command(name = "seqd", version)]
struct Args {
    /// TOML configuration file (see raft-config/).
    #[arg(long, env = "SEQD_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides node.id.
    #[arg(long, env = "SEQD_NODE_ID")]
    node_id: Option<u64>,
    /// Overrides node.listen (ip:port).
    #[arg(long, env = "SEQD_LISTEN")]
    listen: Option<String>,
    /// Overrides node.data_dir.
    #[arg(long, env = "SEQD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides the peer list: id=ip:port,id=ip:port,...
    #[arg(long, env = "SEQD_PEERS")]
    peers: Option<String>,
    /// Overrides raft.tick_ms.
    #[arg(long, env = "SEQD_TICK_MS")]
    tick_ms: Option<u64>,
    /// Overrides raft.election_ticks.
    #[arg(long, env = "SEQD_ELECTION_TICKS")]
    election_ticks: Option<usize>,
    /// Overrides raft.compact_threshold.
    #[arg(long, env = "SEQD_COMPACT_THRESHOLD")]
    compact_threshold: Option<u64>,
    /// Overrides raft.read_mode: read_index or lease.
    #[arg(long, env = "SEQD_READ_MODE", value_enum)]
    read_mode: Option<seqd::config::ReadMode>,
    /// Overrides node.join: start empty and wait to be added to a cluster.
    /// `--join=false` (or SEQD_JOIN=false, =0) overrides a file's
    /// `join = true`.
    #[arg(
        long,
        env = "SEQD_JOIN",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    join: Option<bool>,
    /// Test only: start with the clock shifted by this many ms.
    #[arg(long, env = "SEQD_CLOCK_OFFSET_MS", allow_hyphen_values = true)]
    clock_offset_ms: Option<i64>,
    /// Test only: accept Admin.InjectFault (`=false` overrides the file).
    #[arg(
        long,
        env = "SEQD_ALLOW_FAULT_INJECTION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    allow_fault_injection: Option<bool>,
    /// Test only: exit inside the next snapshot install through a table
    /// file, after this step (staged or ingested), as a crash would.
    #[arg(long, env = "SEQD_STOP_IN_SNAPSHOT_INSTALL", value_enum)]
    stop_in_snapshot_install: Option<seqd::config::InstallStep>,
    /// Overrides metrics.listen: serve Prometheus /metrics on ip:port.
    #[arg(long, env = "SEQD_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Overrides node.worker_threads (0: one per CPU but one, at least one).
    #[arg(long, env = "SEQD_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Overrides node.secret, the cluster's shared secret (peers and Admin
    /// changes must send it).
    #[arg(long, env = "SEQD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long, env = "SEQD_LOG_JSON")]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            let argv: Vec<_> = std::env::args_os().skip(1).collect();
            if let Some(note) = env_note(&e, &argv, |var| std::env::var_os(var)) {
                eprintln!("{note}");
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    seqd::telemetry::init_logging(args.log_json);
    disable_transparent_huge_pages();
    let overrides = Overrides {
        node_id: args.node_id,
        listen: args.listen,
        data_dir: args.data_dir,
        peers: args.peers,
        tick_ms: args.tick_ms,
        election_ticks: args.election_ticks,
        compact_threshold: args.compact_threshold,
        read_mode: args.read_mode,
        join: args.join,
        clock_offset_ms: args.clock_offset_ms,
        allow_fault_injection: args.allow_fault_injection,
        stop_in_snapshot_install: args.stop_in_snapshot_install,
        metrics_listen: args.metrics_listen,
        worker_threads: args.worker_threads,
        secret: args.secret.map(seqd::config::SecretText::new),
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("seqd: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // available_parallelism counts the CPUs this process may use (affinity,
    // cgroup quota), so a container limited to two CPUs runs one worker.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .enable_all()
        .worker_threads(config.node.runtime_workers(cpus));
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("seqd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(seqd::server::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seqd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Names the environment variable a refused value came from. clap names
/// only the flag (`--tick-ms <TICK_MS>`), and an operator who set
/// `SEQD_TICK_MS` in a compose file finds no such flag anywhere.
fn env_note(
    err: &clap::Error,
    argv: &[std::ffi::OsString],
    env: impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let Some(ContextValue::String(shown)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    // `--tick-ms <TICK_MS>`, or `--join[=<JOIN>]`.
    let long = shown
        .strip_prefix("--")?
        .split(['=', ' ', '['])
        .next()
        .filter(|l| !l.is_empty())?;
    let command = Args::command();
    let arg = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?;
    let var = arg.get_env()?;
    let flag = format!("--{long}");
    let given = argv.iter().any(|a| {
        a.to_str().is_some_and(|a| {
            a == flag
                || a.strip_prefix(flag.as_str())
                    .is_some_and(|r| r.starts_with('='))
        })
    });
    if given || env(var).is_none() {
        return None;
    }
    Some(format!(
        "note: the value came from the environment variable {} (no {flag} was given)",
        var.to_string_lossy()
    ))
}

/// Transparent huge pages off for this process, whatever the host's
/// setting (`always` gives them without asking): the first touch of a fresh
/// 2 MiB page zeroes all of it on the spot, and on the node loop that held
/// every call for 5-7 ms at a time (session 13,
/// bench/results/2026-12-05-allocator-and-round-trip/).
/// mimalloc is built not to ask for them; this covers the kernel's side.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and sets a flag on
    // this process's memory map; no pointer is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot turn transparent huge pages off; the node loop may stall while the kernel zeroes them"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() {}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--join` alone sets it; `=false` (as `SEQD_JOIN=false`, read by the
    /// same parser) clears a file's `join = true`; absent leaves the file's.
    #[test]
    fn join_can_be_set_and_cleared() {
        let join = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("seqd").chain(args.iter().copied()))
                .map(|a| (a.join, a.allow_fault_injection))
        };
        // A flag given wins over SEQD_JOIN and SEQD_ALLOW_FAULT_INJECTION,
        // whatever this test's environment holds.
        assert_eq!(join(&["--join"]).unwrap().0, Some(true));
        assert_eq!(join(&["--join=false"]).unwrap().0, Some(false));
        assert_eq!(join(&["--join=0"]).unwrap().0, Some(false));
        assert_eq!(
            join(&["--join=yes", "--tick-ms", "50"]).unwrap().0,
            Some(true)
        );
        assert_eq!(
            join(&["--allow-fault-injection=false"]).unwrap().1,
            Some(false)
        );
        let err = join(&["--join=maybe"]).unwrap_err().to_string();
        assert!(err.contains("--join"), "{err}");
        if std::env::var_os("SEQD_JOIN").is_none() {
            assert_eq!(join(&[]).unwrap().0, None);
        }
    }

    /// A refused value that came from a `SEQD_*` variable is blamed on the
    /// variable; one from a flag (also when the variable is set) on the flag.
    #[test]
    fn a_refused_value_names_the_variable_it_came_from() {
        let refused = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("seqd").chain(args.iter().copied())).unwrap_err()
        };
        let set = |name: &str| {
            let name = name.to_owned();
            move |var: &std::ffi::OsStr| (var == name.as_str()).then(|| "abc".into())
        };
        let argv = |args: &[&str]| args.iter().map(Into::into).collect::<Vec<_>>();
        let tick = refused(&["--tick-ms", "abc"]);
        assert_eq!(
            env_note(&tick, &argv(&[]), set("SEQD_TICK_MS")).as_deref(),
            Some(
                "note: the value came from the environment variable SEQD_TICK_MS \
                 (no --tick-ms was given)"
            )
        );
        assert_eq!(
            env_note(&tick, &argv(&["--tick-ms", "abc"]), set("SEQD_TICK_MS")),
            None
        );
        assert_eq!(
            env_note(&tick, &argv(&["--tick-ms=abc"]), set("SEQD_TICK_MS")),
            None
        );
        assert_eq!(env_note(&tick, &argv(&[]), set("SEQD_OTHER")), None);
        // A flag whose name starts another's is not taken for it.
        let election = refused(&["--election-ticks", "abc"]);
        assert!(env_note(
            &election,
            &argv(&["--election-ticks-x"]),
            set("SEQD_ELECTION_TICKS")
        )
        .is_some());
        // `--join[=<JOIN>]`.
        let join = refused(&["--join=maybe"]);
        assert_eq!(
            env_note(&join, &argv(&[]), set("SEQD_JOIN")).as_deref(),
            Some("note: the value came from the environment variable SEQD_JOIN (no --join was given)")
        );
        assert_eq!(
            env_note(&join, &argv(&["--join=maybe"]), set("SEQD_JOIN")),
            None
        );
        // An error about no value names no variable.
        let unknown = refused(&["--no-such-flag"]);
        assert_eq!(env_note(&unknown, &argv(&[]), set("SEQD_TICK_MS")), None);
    }
}
