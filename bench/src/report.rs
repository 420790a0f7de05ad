//! Results: one row per (workload, target), printed as a table and written
//! as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::{TargetKind, Workload};
use crate::driver::{Measurement, OpenMeasurement};
use crate::process::CpuUse;
use crate::stalls::Stalls;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Measured.
    Ok,
    /// The workload does not apply to the target.
    #[serde(rename = "n/a")]
    NotApplicable,
    /// The target failed to start or died.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub target: String,
    /// Concurrent callers of the closed-loop run.
    pub callers: usize,
    /// What a returned number survives.
    pub durability: String,
    pub status: Status,
    /// Why n/a or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub seconds: f64,
    pub calls: u64,
    pub numbers: u64,
    pub errors: u64,
    /// Lost compare-and-swaps that were retried (etcd).
    pub retries: u64,
    pub calls_per_s: f64,
    pub numbers_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// This row's calls/s divided by seqd-3node's for the same workload in
    /// this run.
    pub vs_seqd_3node: Option<f64>,
    /// The same against seqd-1node.
    pub vs_seqd_1node: Option<f64>,
    /// CPU the target and the harness used in the measured window.
    pub cpu: Option<CpuUse>,
    /// The target's CPU per call, in microseconds.
    pub target_cpu_us_per_call: Option<f64>,
    /// Distinct error messages seen, with counts (at most a few).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    /// The machine's own stalls over the measured window (see
    /// [`crate::stalls`]), where they were measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_stalls: Option<Stalls>,
    /// The open-loop run at a fraction of this row's calls/s, if one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_loop: Option<OpenLoopRow>,
    /// With `--rounds` above 1: what every round read (this row is the
    /// round with the median calls/s; its ratios are the median of the
    /// rounds' own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounds: Option<Rounds>,
}

/// One row's figures in every round, in round order (rounds in which it
/// failed left out).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rounds {
    /// Rounds run.
    pub of: usize,
    /// Rounds in which the row was measured.
    pub measured: usize,
    pub calls_per_s: Vec<f64>,
    /// Against seqd-1node / seqd-3node in the same round (rounds in which
    /// that seqd row was measured too).
    pub vs_seqd_1node: Vec<f64>,
    pub vs_seqd_3node: Vec<f64>,
    /// The open-loop runs' tails, where they ran.
    pub open_loop_p99_ms: Vec<f64>,
    pub open_loop_p999_ms: Vec<f64>,
    /// The longest machine stall in each open-loop window, where measured.
    pub open_loop_machine_stall_max_ms: Vec<f64>,
}

/// An open-loop run: calls due at `offered_per_s`, latency from when each
/// was sent (see `driver::drive_open`).
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoopRow {
    /// Of the closed-loop row's calls/s.
    pub fraction: f64,
    pub offered_per_s: f64,
    /// Calls due in the window that succeeded (whenever they ended), per
    /// second of the window: the offered rate less errors, unless the
    /// harness could not send them all.
    pub calls_per_s: f64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Share of calls that found every caller busy and waited for one.
    pub behind_schedule: f64,
    /// How late the harness's dispatcher queued calls against the schedule
    /// (p99, p999, max): part of the latency figures, which run from when
    /// each call was due, and the harness's share of them.
    pub dispatch_late_p99_ms: f64,
    pub dispatch_late_p999_ms: f64,
    pub dispatch_late_max_ms: f64,
    /// CPU the target and the harness used in the measured window.
    pub cpu: Option<CpuUse>,
    /// The target's CPU per call, in microseconds.
    pub target_cpu_us_per_call: Option<f64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    /// The target's own count of the requests it served in the window
    /// (seqd: RPCs and stream batches, from arrival at the handler to the
    /// answer; a batch carries many calls), and the upper bounds of the
    /// histogram buckets holding their p99 and p999 (infinite past the
    /// last bound). `None` for targets without such a histogram.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeLatency>,
    /// A seqd node's `/metrics` could not be read at an edge of the window.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub node_unreadable: bool,
    /// The machine's own stalls over the window (see [`crate::stalls`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_stalls: Option<Stalls>,
}

/// See [`OpenLoopRow::node`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NodeLatency {
    pub requests: u64,
    pub p99_at_most_ms: Option<f64>,
    pub p999_at_most_ms: Option<f64>,
}

impl OpenLoopRow {
    /// Records the target's own histogram over the window: `None` for a
    /// target without one, `Some(None)` if it could not be read.
    pub fn set_served(&mut self, served: Option<Option<crate::served::Buckets>>) {
        self.node_unreadable = matches!(served, Some(None));
        self.node = served.flatten().map(|b| NodeLatency {
            requests: b.total(),
            p99_at_most_ms: b.quantile_bound_ms(0.99),
            p999_at_most_ms: b.quantile_bound_ms(0.999),
        });
    }

    pub fn new(fraction: f64, o: OpenMeasurement, cpu: Option<CpuUse>) -> Self {
        let m = &o.m;
        let q = |q| if m.calls > 0 { m.quantile_ms(q) } else { 0.0 };
        let due = (m.calls + m.errors).max(1);
        let calls_per_s = m.calls as f64 / m.seconds;
        Self {
            fraction,
            offered_per_s: o.offered_per_s,
            calls_per_s,
            cpu,
            target_cpu_us_per_call: cpu.and_then(|c| c.target_us_per_call(calls_per_s)),
            errors: m.errors,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: if m.calls > 0 { m.max_ms() } else { 0.0 },
            behind_schedule: o.behind as f64 / due as f64,
            dispatch_late_p99_ms: o.dispatch_late_us.value_at_quantile(0.99) as f64 / 1000.0,
            dispatch_late_p999_ms: o.dispatch_late_us.value_at_quantile(0.999) as f64 / 1000.0,
            dispatch_late_max_ms: o.dispatch_late_us.max() as f64 / 1000.0,
            error_kinds: o.m.error_kinds,
            node: None,
            node_unreadable: false,
            machine_stalls: None,
        }
    }
}

impl Row {
    fn blank(workload: Workload, target: TargetKind, status: Status, note: Option<String>) -> Self {
        Self {
            workload: workload.name().into(),
            target: target.name().into(),
            callers: 0,
            durability: target.durability().into(),
            status,
            note,
            seconds: 0.0,
            calls: 0,
            numbers: 0,
            errors: 0,
            retries: 0,
            calls_per_s: 0.0,
            numbers_per_s: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            vs_seqd_3node: None,
            vs_seqd_1node: None,
            cpu: None,
            target_cpu_us_per_call: None,
            error_kinds: BTreeMap::new(),
            machine_stalls: None,
            open_loop: None,
            rounds: None,
        }
    }

    /// This row with `callers` as its concurrency.
    pub fn at(mut self, callers: usize) -> Self {
        self.callers = callers;
        self
    }

    pub fn not_applicable(workload: Workload, target: TargetKind, why: &str) -> Self {
        Self::blank(workload, target, Status::NotApplicable, Some(why.into()))
    }

    pub fn failed(workload: Workload, target: TargetKind, why: String) -> Self {
        Self::blank(workload, target, Status::Failed, Some(why))
    }

    pub fn measured(
        workload: Workload,
        target: TargetKind,
        m: Measurement,
        cpu: Option<CpuUse>,
    ) -> Self {
        let mut row = Self::blank(workload, target, Status::Ok, None);
        row.seconds = m.seconds;
        row.calls = m.calls;
        row.numbers = m.numbers;
        row.errors = m.errors;
        row.retries = m.retries;
        row.calls_per_s = m.calls as f64 / m.seconds;
        row.numbers_per_s = m.numbers as f64 / m.seconds;
        row.cpu = cpu;
        row.target_cpu_us_per_call = cpu.and_then(|c| c.target_us_per_call(row.calls_per_s));
        if m.calls > 0 {
            row.p50_ms = m.quantile_ms(0.5);
            row.p99_ms = m.quantile_ms(0.99);
            row.p999_ms = m.quantile_ms(0.999);
            row.max_ms = m.max_ms();
        }
        row.error_kinds = m.error_kinds;
        row
    }
}

/// Fills each row's ratios against the seqd rows of the same workload at
/// the same concurrency.
pub fn fill_ratios(rows: &mut [Row]) {
    let base = |rows: &[Row], of: &Row, target: TargetKind| {
        rows.iter()
            .find(|r| {
                r.workload == of.workload
                    && r.callers == of.callers
                    && r.target == target.name()
                    && r.status == Status::Ok
            })
            .map(|r| r.calls_per_s)
            .filter(|v| *v > 0.0)
    };
    for i in 0..rows.len() {
        if rows[i].status != Status::Ok {
            continue;
        }
        let b3 = base(rows, &rows[i], TargetKind::Seqd3);
        let b1 = base(rows, &rows[i], TargetKind::Seqd1);
        let v = rows[i].calls_per_s;
        rows[i].vs_seqd_3node = b3.map(|b| v / b);
        rows[i].vs_seqd_1node = b1.map(|b| v / b);
    }
}

/// Fills each round's ratios (in place, so the rounds can be reported
/// too) and returns one row per (workload, target) from them (see
/// `Rounds`); a single round's rows as they are. A row that failed in some
/// rounds keeps a note saying in how many; one measured in none is its
/// first round's row.
pub fn combine_rounds(rounds: &mut [Vec<Row>]) -> Vec<Row> {
    for round in rounds.iter_mut() {
        fill_ratios(round);
    }
    if let [only] = rounds {
        return only.clone();
    }
    let mut keys: Vec<(String, String, usize)> = Vec::new();
    for row in rounds.iter().flatten() {
        let key = (row.workload.clone(), row.target.clone(), row.callers);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|(workload, target, callers)| {
            let rows: Vec<&Row> = rounds
                .iter()
                .filter_map(|round| {
                    round.iter().find(|r| {
                        r.workload == workload && r.target == target && r.callers == callers
                    })
                })
                .collect();
            combine_row(&rows, rounds.len())
        })
        .collect()
}

/// `rows`: one (workload, target)'s row from each round that has it.
fn combine_row(rows: &[&Row], of: usize) -> Row {
    let ok: Vec<&Row> = rows
        .iter()
        .copied()
        .filter(|r| r.status == Status::Ok)
        .collect();
    if ok.is_empty() {
        return rows[0].clone();
    }
    let mut by_rate = ok.clone();
    by_rate.sort_by(|a, b| a.calls_per_s.total_cmp(&b.calls_per_s));
    let mut row = (*median(&by_rate)).clone();
    let ratios =
        |f: fn(&Row) -> Option<f64>| -> Vec<f64> { ok.iter().filter_map(|r| f(r)).collect() };
    let vs1 = ratios(|r| r.vs_seqd_1node);
    let vs3 = ratios(|r| r.vs_seqd_3node);
    row.vs_seqd_1node = median_of(&vs1);
    row.vs_seqd_3node = median_of(&vs3);
    if ok.len() < of {
        let why = rows
            .iter()
            .find(|r| r.status != Status::Ok)
            .and_then(|r| r.note.as_deref())
            .and_then(|n| n.lines().next())
            .unwrap_or("not run");
        row.note = Some(format!(
            "measured in {} of {of} rounds (another: {why})",
            ok.len()
        ));
    }
    let open = |f: fn(&OpenLoopRow) -> f64| -> Vec<f64> {
        ok.iter()
            .filter_map(|r| r.open_loop.as_ref().map(f))
            .collect()
    };
    row.rounds = Some(Rounds {
        of,
        measured: ok.len(),
        calls_per_s: ok.iter().map(|r| r.calls_per_s).collect(),
        vs_seqd_1node: vs1,
        vs_seqd_3node: vs3,
        open_loop_p99_ms: open(|o| o.p99_ms),
        open_loop_p999_ms: open(|o| o.p999_ms),
        open_loop_machine_stall_max_ms: ok
            .iter()
            .filter_map(|r| r.open_loop.as_ref()?.machine_stalls.map(|m| m.max_ms))
            .collect(),
    });
    row
}

/// The middle of `sorted` (the lower middle of an even count).
fn median<T>(sorted: &[T]) -> &T {
    &sorted[(sorted.len() - 1) / 2]
}

fn median_of(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| *median(&v))
}

/// "lowest–highest" of `values` (one value alone as itself), each
/// formatted by `f`.
fn spread(values: &[f64], f: impl Fn(f64) -> String) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match values.len() {
        0 => "-".into(),
        1 => f(lo),
        _ => format!("{}–{}", f(lo), f(hi)),
    }
}

/// 1234567.8 -> "1,234,568".
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu_per_call(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |us| format!("{us:.1}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// The table, with notes (n/a reasons, failures, errors) under it.
pub fn table(rows: &[Row]) -> String {
    let with_rounds = rows.iter().any(|r| r.rounds.is_some());
    let mut header = vec!["workload", "target", "calls/s"];
    if with_rounds {
        header.push("rounds: calls/s");
    }
    header.extend([
        "numbers/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "errors",
        "cpu us/call",
        "vs 3node",
        "vs 1node",
        "durability",
    ]);
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut notes = Vec::new();
    for r in rows {
        let mut line = vec![r.workload.clone(), r.target.clone()];
        match r.status {
            Status::Ok => line.push(thousands(r.calls_per_s)),
            Status::NotApplicable => line.push("n/a".into()),
            Status::Failed => line.push("FAILED".into()),
        }
        if with_rounds {
            line.push(
                r.rounds
                    .as_ref()
                    .map_or("-".into(), |k| spread(&k.calls_per_s, thousands)),
            );
        }
        match r.status {
            Status::Ok => line.extend([
                thousands(r.numbers_per_s),
                format!("{:.3}", r.p50_ms),
                format!("{:.3}", r.p99_ms),
                format!("{:.3}", r.p999_ms),
                format!("{:.3}", r.max_ms),
                r.errors.to_string(),
                cpu_per_call(r.target_cpu_us_per_call),
                ratio(r.vs_seqd_3node),
                ratio(r.vs_seqd_1node),
            ]),
            Status::NotApplicable | Status::Failed => {
                line.extend(std::iter::repeat_n("-".to_string(), 9));
            }
        }
        line.push(r.durability.clone());
        cells.push(line);
        if let Some(n) = &r.note {
            let first = n.lines().next().unwrap_or_default();
            notes.push(format!("{} / {}: {first}", r.workload, r.target));
        }
        if r.retries > 0 {
            notes.push(format!(
                "{} / {}: {} compare-and-swap conflicts retried",
                r.workload, r.target, r.retries
            ));
        }
        for (e, n) in &r.error_kinds {
            notes.push(format!("{} / {}: {n} x {e}", r.workload, r.target));
        }
    }
    let mut out = render(&header, &cells, &[0, 1, header.len() - 1]);
    push_notes(&mut out, &notes);
    out
}

/// The peak table: for each (workload, target) with rows at more than one
/// of `points` (caller counts, ascending), its calls/s at each, its peak
/// and where it reached it, and that peak over seqd's peaks; under it, for
/// each concurrency, every target's calls/s over seqd's at that same
/// concurrency. Empty when no row has a second point.
pub fn peak_table(rows: &[Row], points: &[usize]) -> String {
    let measured = |r: &Row| r.status == Status::Ok && points.contains(&r.callers);
    let mut series: Vec<(&str, &str)> = Vec::new();
    for r in rows.iter().filter(|r| measured(r)) {
        if !series.contains(&(&r.workload, &r.target)) {
            series.push((&r.workload, &r.target));
        }
    }
    let at = |workload: &str, target: &str, callers: usize| {
        rows.iter().find(|r| {
            measured(r) && r.workload == workload && r.target == target && r.callers == callers
        })
    };
    series.retain(|(w, t)| points.iter().filter(|&&c| at(w, t, c).is_some()).count() > 1);
    if series.is_empty() {
        return String::new();
    }
    let peak = |workload: &str, target: &str| {
        points
            .iter()
            .filter_map(|&c| at(workload, target, c).map(|r| (r.calls_per_s, c)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    };
    let names: Vec<String> = points.iter().map(|c| format!("{c} callers")).collect();
    let mut header: Vec<&str> = vec!["workload", "target"];
    header.extend(names.iter().map(String::as_str));
    header.extend([
        "peak calls/s",
        "at callers",
        "vs 3node peak",
        "vs 1node peak",
        "half of peak: offered/s",
        "p99 / p999 ms",
    ]);
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut notes = Vec::new();
    for &(workload, target) in &series {
        let mut line = vec![workload.to_string(), target.to_string()];
        for &c in points {
            line.push(at(workload, target, c).map_or("-".into(), |r| thousands(r.calls_per_s)));
        }
        let (top, top_at) = peak(workload, target).unwrap_or((0.0, 0));
        let over = |seqd: TargetKind| {
            peak(workload, seqd.name())
                .filter(|(p, _)| *p > 0.0)
                .map(|(p, _)| top / p)
        };
        // The open-loop run after the series' last point (not the one
        // after the --callers row, at half of that row's rate).
        let half = points
            .last()
            .and_then(|&c| at(workload, target, c))
            .and_then(|r| r.open_loop.as_ref());
        line.extend([
            thousands(top),
            top_at.to_string(),
            ratio(over(TargetKind::Seqd3)),
            ratio(over(TargetKind::Seqd1)),
            half.map_or("-".into(), |o| thousands(o.offered_per_s)),
            half.map_or("-".into(), |o| {
                format!("{:.3} / {:.3}", o.p99_ms, o.p999_ms)
            }),
        ]);
        cells.push(line);
    }
    for &c in points {
        for base in [TargetKind::Seqd1, TargetKind::Seqd3] {
            let mut against = Vec::new();
            for &(workload, target) in &series {
                if target == base.name() {
                    continue;
                }
                let vs = at(workload, target, c).and_then(|r| match base {
                    TargetKind::Seqd3 => r.vs_seqd_3node,
                    _ => r.vs_seqd_1node,
                });
                if let Some(v) = vs {
                    against.push(format!("{workload}/{target} {v:.2}x"));
                }
            }
            if !against.is_empty() {
                notes.push(format!(
                    "{c} callers, calls/s over {}'s: {}",
                    base.name(),
                    against.join(", ")
                ));
            }
        }
    }
    let mut out = render(&header, &cells, &[0, 1]);
    push_notes(&mut out, &notes);
    out
}

/// Dispatch lateness (p99) above which an open-loop row's latency is
/// flagged as not the target's alone.
const LATE_HARNESS_MS: f64 = 1.0;

/// The open-loop runs' table (rows without one are left out), with notes.
pub fn open_loop_table(rows: &[Row]) -> String {
    let with_rounds = rows.iter().any(|r| r.rounds.is_some());
    let mut header = vec![
        "workload",
        "target",
        "offered/s",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
    ];
    if with_rounds {
        header.extend(["rounds: p99 ms", "rounds: p999 ms"]);
    }
    header.extend([
        "max ms",
        "errors",
        "behind",
        "sent late p99 / p999 / max ms",
        "cpu us/call",
        "target cores",
        "harness cores",
        "node p99 <= ms",
        "node p999 <= ms",
        "machine stall max ms",
    ]);
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let mut notes = Vec::new();
    let mut not_realtime = false;
    let bound = |v: Option<f64>| match v {
        None => "-".to_string(),
        Some(ms) if ms.is_infinite() => "more".to_string(),
        Some(ms) => format!("{ms}"),
    };
    for r in rows {
        let Some(o) = &r.open_loop else { continue };
        let mut line = vec![
            r.workload.clone(),
            r.target.clone(),
            thousands(o.offered_per_s),
            thousands(o.calls_per_s),
            format!("{:.3}", o.p50_ms),
            format!("{:.3}", o.p99_ms),
            format!("{:.3}", o.p999_ms),
        ];
        if with_rounds {
            let ms = |v: f64| format!("{v:.2}");
            let k = r.rounds.clone().unwrap_or_default();
            line.push(spread(&k.open_loop_p99_ms, ms));
            line.push(spread(&k.open_loop_p999_ms, ms));
        }
        line.extend([
            format!("{:.3}", o.max_ms),
            o.errors.to_string(),
            format!("{:.1}%", o.behind_schedule * 100.0),
            format!(
                "{:.3} / {:.3} / {:.3}",
                o.dispatch_late_p99_ms, o.dispatch_late_p999_ms, o.dispatch_late_max_ms
            ),
            cpu_per_call(o.target_cpu_us_per_call),
            o.cpu
                .map_or("-".into(), |c| format!("{:.2}", c.target_cores)),
            o.cpu
                .map_or("-".into(), |c| format!("{:.2}", c.harness_cores)),
            bound(o.node.and_then(|n| n.p99_at_most_ms)),
            bound(o.node.and_then(|n| n.p999_at_most_ms)),
            machine_stall(r, o),
        ]);
        cells.push(line);
        not_realtime |= o.machine_stalls.is_some_and(|m| !m.realtime);
        if o.dispatch_late_p99_ms > LATE_HARNESS_MS {
            notes.push(format!(
                "{} / {} (open loop): the harness fell behind its schedule (sent late p99 {:.1} ms), \
                 so calls left in bursts: this row's latency is the harness's as much as the target's",
                r.workload, r.target, o.dispatch_late_p99_ms
            ));
        }
        for (e, n) in &o.error_kinds {
            notes.push(format!(
                "{} / {} (open loop): {n} x {e}",
                r.workload, r.target
            ));
        }
        if o.node_unreadable {
            notes.push(format!(
                "{} / {} (open loop): a node's /metrics could not be read, so no node figures",
                r.workload, r.target
            ));
        }
    }
    if cells.len() == 1 {
        return String::new();
    }
    if not_realtime {
        notes.push(
            "machine stalls measured without a real-time priority (not root, no CAP_SYS_NICE): \
             they include waits for a CPU behind the harness and the targets"
                .to_string(),
        );
    }
    let mut out = render(&header, &cells, &[0, 1]);
    push_notes(&mut out, &notes);
    out
}

/// The longest machine stall in the open-loop window; with rounds, the
/// spread of every round's.
fn machine_stall(r: &Row, o: &OpenLoopRow) -> String {
    let ms = |v: f64| format!("{v:.1}");
    match &r.rounds {
        Some(k) if !k.open_loop_machine_stall_max_ms.is_empty() => {
            spread(&k.open_loop_machine_stall_max_ms, ms)
        }
        _ => o.machine_stalls.map_or("-".into(), |m| ms(m.max_ms)),
    }
}

/// Aligned columns: the columns in `left` left-aligned, the rest (figures)
/// right-aligned; a rule under the header.
fn render(header: &[&str], cells: &[Vec<String>], left: &[usize]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, line) in cells.iter().enumerate() {
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            if left.contains(&c) {
                let _ = write!(text, "{cell:<w$}  ", w = widths[c]);
            } else {
                let _ = write!(text, "{cell:>w$}  ", w = widths[c]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

fn push_notes(out: &mut String, notes: &[String]) {
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            let _ = writeln!(out, "  {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(workload: &str, target: TargetKind, cps: f64) -> Row {
        let mut r = Row::blank(Workload::Next, target, Status::Ok, None);
        r.workload = workload.into();
        r.calls_per_s = cps;
        r
    }

    #[test]
    fn ratios_are_against_the_same_workload() {
        let mut rows = vec![
            ok("next", TargetKind::Seqd1, 200.0),
            ok("next", TargetKind::Seqd3, 100.0),
            ok("next", TargetKind::RedisNone, 50.0),
            ok("batch", TargetKind::Seqd3, 10.0),
            ok("batch", TargetKind::Etcd, 1.0),
        ];
        fill_ratios(&mut rows);
        assert_eq!(rows[2].vs_seqd_3node, Some(0.5));
        assert_eq!(rows[2].vs_seqd_1node, Some(0.25));
        assert_eq!(rows[4].vs_seqd_3node, Some(0.1));
        assert_eq!(rows[4].vs_seqd_1node, None);
    }

    #[test]
    fn ratios_and_rounds_are_per_concurrency() {
        let round = |seqd32: f64, redis256: f64| {
            vec![
                ok("next", TargetKind::Seqd1, seqd32).at(32),
                ok("next", TargetKind::RedisNone, 400.0).at(32),
                ok("next", TargetKind::Seqd1, 500.0).at(256),
                ok("next", TargetKind::RedisNone, redis256).at(256),
            ]
        };
        let mut rounds = vec![
            round(200.0, 250.0),
            round(100.0, 450.0),
            round(300.0, 350.0),
        ];
        let rows = combine_rounds(&mut rounds);
        assert_eq!(rows.len(), 4, "one row per target and concurrency");
        let redis = |c: usize| {
            rows.iter()
                .find(|r| r.target == "redis-none" && r.callers == c)
                .unwrap()
        };
        // At 32 callers Redis is 2x, 4x, 4/3x seqd: median 2x; at 256, its
        // own seqd row's 500 counts, not the 32-caller one.
        assert_eq!(redis(32).vs_seqd_1node, Some(2.0));
        assert_eq!(redis(256).vs_seqd_1node, Some(0.7));
        assert_eq!(redis(256).calls_per_s, 350.0);
    }

    #[test]
    fn peak_table_names_each_targets_peak_and_where() {
        let mut rows = vec![
            ok("next", TargetKind::Seqd1, 200.0).at(32),
            ok("next", TargetKind::RedisNone, 400.0).at(32),
            ok("next", TargetKind::Seqd1, 600.0).at(256),
            ok("next", TargetKind::RedisNone, 450.0).at(256),
            // One point only: no peak to speak of.
            ok("batch", TargetKind::Seqd1, 20.0).at(32),
        ];
        // The open-loop run after seqd's last point, at half of its peak;
        // Redis's only one is after its 32-caller row, not half of peak.
        let open = |offered_per_s: f64| {
            Some(OpenLoopRow::new(
                0.5,
                OpenMeasurement {
                    offered_per_s,
                    m: Measurement::empty(),
                    behind: 0,
                    dispatch_late_us: hdrhistogram::Histogram::new(3).unwrap(),
                },
                None,
            ))
        };
        rows[2].open_loop = open(300.0);
        rows[1].open_loop = open(200.0);
        fill_ratios(&mut rows);
        let t = peak_table(&rows, &[32, 256]);
        let line = |target: &str| {
            t.lines()
                .find(|l| l.starts_with("next") && l.contains(target))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        // seqd: 200 at 32, 600 at 256, peak 600 at 256, 1.00x of itself.
        // Half of its peak offered: 300 calls/s (no calls measured here).
        assert_eq!(
            line("seqd-1node")[2..],
            ["200", "600", "600", "256", "-", "1.00x", "300", "0.000", "/", "0.000"]
        );
        // Redis peaks at 256 too, at 0.75x seqd's peak; no open-loop run.
        assert_eq!(
            line("redis-none")[2..],
            ["400", "450", "450", "256", "-", "0.75x", "-", "-"]
        );
        assert!(!t.lines().any(|l| l.starts_with("batch")), "{t}");
        assert!(
            t.contains("32 callers, calls/s over seqd-1node's: next/redis-none 2.00x"),
            "{t}"
        );
        assert!(
            t.contains("256 callers, calls/s over seqd-1node's: next/redis-none 0.75x"),
            "{t}"
        );
        assert_eq!(peak_table(&rows, &[32]), "");
    }

    #[test]
    fn open_loop_table_flags_a_harness_that_fell_behind() {
        let open = |late_ms: f64| OpenLoopRow {
            fraction: 0.5,
            offered_per_s: 100.0,
            calls_per_s: 100.0,
            errors: 0,
            p50_ms: 0.1,
            p99_ms: 0.2,
            p999_ms: 0.3,
            max_ms: 0.4,
            behind_schedule: 0.0,
            dispatch_late_p99_ms: late_ms,
            dispatch_late_p999_ms: late_ms,
            dispatch_late_max_ms: late_ms,
            cpu: Some(CpuUse {
                target_cores: 0.5,
                harness_cores: 0.25,
            }),
            target_cpu_us_per_call: Some(5000.0),
            error_kinds: BTreeMap::new(),
            node: None,
            node_unreadable: false,
            machine_stalls: None,
        };
        let mut on_time = ok("next", TargetKind::Seqd3, 200.0);
        on_time.open_loop = Some(open(0.2));
        let mut late = ok("next", TargetKind::RedisNone, 400.0);
        late.open_loop = Some(open(19.5));
        let closed_only = ok("next", TargetKind::Etcd, 10.0);
        let t = open_loop_table(&[on_time, late, closed_only]);
        assert!(t.contains("seqd-3node"));
        assert!(t.contains("5000.0"), "CPU per call:\n{t}");
        assert!(
            !t.contains("etcd"),
            "a row without an open-loop run is left out:\n{t}"
        );
        assert!(t.contains("next / redis-none (open loop): the harness fell behind"));
        assert!(!t.contains("next / seqd-3node (open loop)"));
        assert_eq!(open_loop_table(&[ok("next", TargetKind::Seqd1, 1.0)]), "");
    }

    #[test]
    fn open_loop_table_shows_the_machines_longest_stall_and_how_it_was_measured() {
        let row = |realtime: bool| {
            let mut r = ok("next", TargetKind::Seqd3, 200.0);
            let mut open = OpenLoopRow::new(
                0.5,
                OpenMeasurement {
                    offered_per_s: 100.0,
                    m: Measurement::empty(),
                    behind: 0,
                    dispatch_late_us: hdrhistogram::Histogram::new(3).unwrap(),
                },
                None,
            );
            open.machine_stalls = Some(Stalls {
                realtime,
                wakes: 3000,
                stalls: 1,
                max_ms: 17.54,
                stalled_ms: 17.54,
            });
            r.open_loop = Some(open);
            r
        };
        let t = open_loop_table(&[row(true)]);
        assert!(
            t.contains("machine stall max ms") && t.contains("17.5"),
            "{t}"
        );
        assert!(!t.contains("without a real-time priority"), "{t}");
        let t = open_loop_table(&[row(false)]);
        assert!(t.contains("without a real-time priority"), "{t}");
    }

    #[test]
    fn rounds_give_the_median_round_and_the_median_of_each_rounds_ratio() {
        let round = |seqd: f64, redis: f64| {
            vec![
                ok("next", TargetKind::Seqd1, seqd),
                ok("next", TargetKind::RedisNone, redis),
                Row::not_applicable(Workload::Ids, TargetKind::RedisNone, "no IDs"),
            ]
        };
        let mut failed = round(250.0, 0.0);
        failed[1] = Row::failed(Workload::Next, TargetKind::RedisNone, "died\nstderr".into());
        let rows = combine_rounds(&mut [
            round(100.0, 200.0),
            round(300.0, 150.0),
            round(200.0, 400.0),
            failed,
        ]);
        assert_eq!(rows.len(), 3);
        let seqd = &rows[0];
        // The median round of 100, 200, 250, 300 (the lower middle).
        assert_eq!(seqd.calls_per_s, 200.0);
        let k = seqd.rounds.as_ref().unwrap();
        assert_eq!((k.of, k.measured), (4, 4));
        assert_eq!(k.calls_per_s, vec![100.0, 300.0, 200.0, 250.0]);
        assert_eq!(seqd.vs_seqd_1node, Some(1.0));

        let redis = &rows[1];
        assert_eq!(redis.status, Status::Ok);
        assert_eq!(redis.calls_per_s, 200.0);
        // Each round's own ratio: 2.0, 0.5, 2.0; not 200 / 200.
        assert_eq!(
            redis.rounds.as_ref().unwrap().vs_seqd_1node,
            vec![2.0, 0.5, 2.0]
        );
        assert_eq!(redis.vs_seqd_1node, Some(2.0));
        assert_eq!(
            redis.note.as_deref(),
            Some("measured in 3 of 4 rounds (another: died)")
        );
        assert_eq!(rows[2].status, Status::NotApplicable);
        assert!(rows[2].rounds.is_none());

        let t = table(&rows);
        assert!(t.contains("rounds: calls/s"), "{t}");
        assert!(t.contains("100–300"), "{t}");
        assert!(t.contains("2.00x"), "{t}");
        assert!(
            t.contains("next / redis-none: measured in 3 of 4 rounds"),
            "{t}"
        );
    }

    #[test]
    fn one_round_is_left_as_it_ran() {
        let rows = combine_rounds(&mut [vec![
            ok("next", TargetKind::Seqd1, 100.0),
            ok("next", TargetKind::RedisNone, 50.0),
        ]]);
        assert_eq!(rows[1].vs_seqd_1node, Some(0.5));
        assert!(rows.iter().all(|r| r.rounds.is_none()));
        assert!(!table(&rows).contains("rounds"));
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }

    #[test]
    fn table_marks_na_rows_and_lists_notes() {
        let rows = vec![
            ok("ids", TargetKind::Seqd3, 5.0),
            Row::not_applicable(Workload::Ids, TargetKind::Etcd, "no Snowflake ID service"),
        ];
        let t = table(&rows);
        assert!(t.contains("n/a"));
        assert!(t.contains("ids / etcd: no Snowflake ID service"));
        assert!(t.contains("raft majority fsync"));
    }
}
