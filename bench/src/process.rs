//! Running the targets: free loopback ports, child processes that are killed
//! when their guard drops (normal end, error, panic or Ctrl-C), and the
//! checks that turn a failed start into a message naming the problem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `n` distinct free TCP ports on 127.0.0.1, below the kernel's ephemeral
/// range (see [`crate::ports::free_ports`]); the child that binds them
/// starts right after (a race with a program binding the same port remains
/// possible, and shows as a failed start naming the port).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    crate::ports::free_ports(n).context("cannot find free loopback ports")
}

/// A started process; killed and reaped on drop.
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with its output going to `log`, no stdin, and the working
    /// directory `cwd` (Redis and etcd write files into their cwd; it is
    /// always a temporary directory, never the repository).
    pub fn spawn(name: &str, mut cmd: Command, cwd: &Path, log: PathBuf) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Errors, with the end of its log, if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 15)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 15)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// CPU time (user + system, all threads) a process has used so far, from
/// /proc; None where /proc does not have it (not Linux, or it has exited).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    parse_cpu_seconds(&std::fs::read_to_string(path).ok()?)
}

/// Average cores used over a measurement window by the target's processes
/// and by this harness (its callers, client library and dispatcher).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CpuUse {
    pub target_cores: f64,
    pub harness_cores: f64,
}

impl CpuUse {
    /// Target CPU per call, in microseconds.
    pub fn target_us_per_call(&self, calls_per_s: f64) -> Option<f64> {
        (calls_per_s > 0.0).then(|| self.target_cores * 1e6 / calls_per_s)
    }
}

/// The target's processes' and this harness's CPU seconds so far.
fn cpu_sample(pids: &[u32]) -> Option<(f64, f64)> {
    let mut target = 0.0;
    for p in pids {
        target += cpu_seconds(Some(*p))?;
    }
    Some((target, cpu_seconds(None)?))
}

fn cpu_between(before: (f64, f64), after: (f64, f64), secs: f64) -> CpuUse {
    CpuUse {
        target_cores: (after.0 - before.0) / secs,
        harness_cores: (after.1 - before.1) / secs,
    }
}

/// Measures CPU use over the window a driver measures in (`warmup` from now,
/// `measure` long); start it together with the driver. None if /proc cannot
/// tell (a process ended, or not Linux).
pub async fn cpu_over(pids: Vec<u32>, warmup: Duration, measure: Duration) -> Option<CpuUse> {
    tokio::time::sleep(warmup).await;
    let before = cpu_sample(&pids);
    tokio::time::sleep(measure).await;
    let after = cpu_sample(&pids)?;
    Some(cpu_between(before?, after, measure.as_secs_f64()))
}

/// Runs `run` (a driver whose measured window starts `warmup` from now and
/// ends with it: a call count) and measures CPU use from the window's start
/// to `run`'s end.
pub async fn cpu_during<F: std::future::Future>(
    pids: Vec<u32>,
    warmup: Duration,
    run: F,
) -> (F::Output, Option<CpuUse>) {
    let start = async {
        tokio::time::sleep(warmup).await;
        (cpu_sample(&pids), std::time::Instant::now())
    };
    let (out, (before, from)) = tokio::join!(run, start);
    let secs = from.elapsed().as_secs_f64();
    let cpu = match (before, cpu_sample(&pids)) {
        (Some(b), Some(a)) if secs > 0.0 => Some(cpu_between(b, a, secs)),
        _ => None,
    };
    (out, cpu)
}

/// utime, stime, cutime and cstime of a /proc/<pid>/stat line (fields 14
/// to 17), in clock ticks of USER_HZ, which Linux fixes at 100 for what it
/// shows in /proc. The children's share counts the work a target forks
/// and reaps (Redis rewrites its append-only file in a child).
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: fields are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let mut ticks = 0u64;
    for _ in 0..4 {
        ticks += fields.next()?.parse::<u64>().ok()?;
    }
    Some(ticks as f64 / 100.0)
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // SIGKILL, then reap: nothing the targets do at shutdown matters to
        // the figures, and a stuck target must not outlive the run.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a log file (at most 16 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(cannot read {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the caller's variables with `prefix` from a child's environment:
/// e.g. a `SEQD_LISTEN` or `ETCD_DATA_DIR` in the user's shell would override
/// the generated configuration.
pub fn clear_env_prefix(cmd: &mut Command, prefix: &str, keep: &[&str]) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with(prefix) && !keep.contains(&k) {
                cmd.env_remove(k);
            }
        }
    }
}

/// Resolves a program name on PATH (or checks a path), naming the fix when
/// it is missing.
pub fn find_program(program: &Path, what: &str, fix: &str) -> Result<PathBuf> {
    if program.components().count() > 1 {
        if program.is_file() {
            return Ok(program.to_path_buf());
        }
        bail!("{what} not found at {}: {fix}", program.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{what} not found ({} is not on PATH): {fix}",
        program.display()
    )
}

/// First line of `program --version`, for the results.
pub fn version_line(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The filesystem type `dir` lives on, from /proc/self/mountinfo (Linux);
/// used to warn when fsync would cost nothing (tmpfs), which would make the
/// durable rows meaningless.
pub fn fs_type(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        // Fields: id parent major:minor root mount-point options ... - fstype source opts
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(mount), Some(dash)) = (fields.get(4), fields.iter().position(|f| *f == "-"))
        else {
            continue;
        };
        let Some(fstype) = fields.get(dash + 1) else {
            continue;
        };
        let mount = mount.replace("\\040", " ");
        if dir.starts_with(&mount) && best.as_ref().is_none_or(|(len, _)| mount.len() >= *len) {
            best = Some((mount.len(), fstype.to_string()));
        }
    }
    best.map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(5).unwrap();
        let set: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(set.len(), 5);
    }

    #[test]
    fn missing_program_names_the_fix() {
        let e = find_program(Path::new("no-such-program-xyz"), "thing", "install it").unwrap_err();
        assert_eq!(
            e.to_string(),
            "thing not found (no-such-program-xyz is not on PATH): install it"
        );
    }

    /// A process's own CPU and its reaped children's, from the fields
    /// after the last ')' (a command name may hold spaces and parentheses).
    #[test]
    fn cpu_seconds_count_the_process_and_its_reaped_children() {
        let stat = "4242 (redis (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 50 30 20 20 0 5 0 100 0 0";
        assert_eq!(parse_cpu_seconds(stat), Some(2.5));
        assert_eq!(parse_cpu_seconds("4242 (short) S 1 2"), None);
    }

    #[test]
    fn root_has_a_filesystem_type() {
        assert!(fs_type(Path::new("/")).is_some());
    }
}
