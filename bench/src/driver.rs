//! Load: closed loop (N callers, each with one call in flight, for a warm-up
//! and then a measured window; only calls that complete inside the window
//! count, so throughput is completions per second of the window) and open
//! loop (calls due at a fixed rate, latency from when each was due).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use hdrhistogram::Histogram;

/// One successful call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Done {
    /// Numbers (or IDs) the call handed out.
    pub numbers: u64,
    /// Attempts the target made us repeat (etcd compare-and-swap conflicts).
    pub retries: u32,
}

/// Something that makes one call of a workload against one target.
pub trait Caller: Send + 'static {
    fn call(&mut self) -> impl Future<Output = Result<Done, String>> + Send;
}

/// A call that takes longer than this counts as an error, so one stuck
/// request cannot hold the run past its end.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed call: a target without a leader answers at once, and
/// spinning on it would only inflate the error count.
const ERROR_PAUSE: Duration = Duration::from_millis(1);
/// Error messages kept per run (distinct texts, with counts).
const MAX_ERROR_KINDS: usize = 5;

/// Latency in microseconds, 1 µs to 60 s, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What a run measured.
#[derive(Debug)]
pub struct Measurement {
    pub seconds: f64,
    pub calls: u64,
    pub numbers: u64,
    pub errors: u64,
    pub retries: u64,
    pub latency_us: Histogram<u64>,
    /// Distinct error messages and how often each occurred.
    pub error_kinds: BTreeMap<String, u64>,
}

impl Measurement {
    pub(crate) fn empty() -> Self {
        Self {
            seconds: 0.0,
            calls: 0,
            numbers: 0,
            errors: 0,
            retries: 0,
            latency_us: new_histogram(),
            error_kinds: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Measurement) {
        self.calls += other.calls;
        self.numbers += other.numbers;
        self.errors += other.errors;
        self.retries += other.retries;
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        for (k, n) in other.error_kinds {
            if self.error_kinds.len() < MAX_ERROR_KINDS || self.error_kinds.contains_key(&k) {
                *self.error_kinds.entry(k).or_default() += n;
            }
        }
    }

    /// Counts one call that took `took`.
    fn record(&mut self, result: Result<Done, String>, took: Duration) {
        match result {
            Ok(done) => {
                self.calls += 1;
                self.numbers += done.numbers;
                self.retries += u64::from(done.retries);
                self.latency_us.saturating_record(micros(took));
            }
            Err(e) => {
                self.errors += 1;
                if self.error_kinds.len() < MAX_ERROR_KINDS || self.error_kinds.contains_key(&e) {
                    *self.error_kinds.entry(e).or_default() += 1;
                }
            }
        }
    }

    /// Latency at quantile `q`, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }
}

/// Makes exactly `calls_each` calls on every caller, concurrently; returns
/// the first error, if any call failed.
pub async fn run_calls<C: Caller>(callers: Vec<C>, calls_each: u64) -> Result<(), String> {
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..calls_each {
                    match tokio::time::timeout(CALL_TIMEOUT, c.call()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(format!("no answer within {CALL_TIMEOUT:?}")),
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut first = Ok(());
    for t in tasks {
        let r = t
            .await
            .unwrap_or_else(|e| Err(format!("caller task failed: {e}")));
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// Runs every caller concurrently for `warmup` + `measure`.
pub async fn drive<C: Caller>(callers: Vec<C>, warmup: Duration, measure: Duration) -> Measurement {
    let from = Instant::now() + warmup;
    let mut m = drive_until(callers, from, End::At(from + measure)).await;
    m.seconds = measure.as_secs_f64();
    m
}

/// Runs every caller concurrently: a `warmup`, then until `total` calls
/// started after it have completed (failed ones included; each caller
/// takes a call from the count before it starts one). Seconds run from the
/// end of the warm-up to the last of those calls' completion.
pub async fn drive_count<C: Caller>(callers: Vec<C>, warmup: Duration, total: u64) -> Measurement {
    let from = Instant::now() + warmup;
    let taken = Arc::new(AtomicU64::new(0));
    drive_until(callers, from, End::After { taken, total }).await
}

/// When the callers of a closed-loop run stop, and which calls count.
#[derive(Clone)]
enum End {
    /// At this instant; calls that complete between the warm-up's end and
    /// it count.
    At(Instant),
    /// Once `total` calls started after the warm-up; those count.
    After { taken: Arc<AtomicU64>, total: u64 },
}

/// Runs every caller until `end`; seconds are from `from` (the warm-up's
/// end) to the last counted call's completion.
async fn drive_until<C: Caller>(callers: Vec<C>, from: Instant, end: End) -> Measurement {
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|c| tokio::spawn(caller_loop(c, from, end.clone())))
        .collect();
    let mut all = Measurement::empty();
    let mut last = from;
    for t in tasks {
        match t.await {
            Ok((m, done)) => {
                all.merge(m);
                last = last.max(done.unwrap_or(from));
            }
            Err(e) => {
                all.errors += 1;
                *all.error_kinds
                    .entry(format!("caller task failed: {e}"))
                    .or_default() += 1;
            }
        }
    }
    all.seconds = (last - from).as_secs_f64();
    all
}

/// One caller of a closed-loop run: what it measured, and when its last
/// counted call completed.
async fn caller_loop<C: Caller>(
    mut c: C,
    from: Instant,
    end: End,
) -> (Measurement, Option<Instant>) {
    let mut m = Measurement::empty();
    let mut last = None;
    loop {
        let t0 = Instant::now();
        let stop = match &end {
            End::At(until) => t0 >= *until,
            End::After { taken, total } => {
                t0 >= from && taken.fetch_add(1, Ordering::Relaxed) >= *total
            }
        };
        if stop {
            break;
        }
        let result = match tokio::time::timeout(CALL_TIMEOUT, c.call()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        let t1 = Instant::now();
        let counted = match &end {
            End::At(until) => t1 >= from && t1 <= *until,
            End::After { .. } => t0 >= from,
        };
        let failed = result.is_err();
        if counted {
            m.record(result, t1 - t0);
            last = Some(t1);
        }
        if failed {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
    (m, last)
}

/// What an open-loop run measured: the calls as [`Measurement`] (latency
/// from when each call was due, waits for the dispatcher and for a free
/// caller included, see
/// [`drive_open`]), plus how well the schedule was kept.
#[derive(Debug)]
pub struct OpenMeasurement {
    /// Calls per second the schedule asked for.
    pub offered_per_s: f64,
    pub m: Measurement,
    /// Counted calls that found every caller busy, so waited for one (and
    /// that wait is in their latency).
    pub behind: u64,
    /// How late the dispatcher queued calls against the schedule, in µs
    /// (the harness's share of the latency).
    pub dispatch_late_us: Histogram<u64>,
}

/// Shortest sleep of the open-loop dispatcher.
const MIN_SLEEP: Duration = Duration::from_micros(100);

/// The calls of an open-loop run that are due and not yet taken, in the
/// order they fell due. `ready` holds a permit per queued entry, so a free
/// caller waits on it (fairly: the longest idle caller goes first) and a
/// permit always finds its entry.
struct Due {
    queue: std::sync::Mutex<std::collections::VecDeque<Ticket>>,
    ready: Semaphore,
}

/// One queued entry: a call due at `due` (counted or in the warm-up), or
/// the end of the run for the caller that takes it.
enum Ticket {
    Call { due: Instant, counted: bool },
    Stop,
}

impl Due {
    /// Queues `tickets` and wakes as many waiting callers, under one lock.
    fn push(&self, tickets: impl IntoIterator<Item = Ticket>) {
        let n = {
            let mut q = lock(&self.queue);
            let before = q.len();
            q.extend(tickets);
            q.len() - before
        };
        self.ready.add_permits(n);
    }

    /// The next entry, and whether it had been waiting for a caller: one
    /// that was already queued when this caller became free, since a
    /// permit goes to a waiting caller first.
    async fn take(&self) -> (Ticket, bool) {
        let queued = match self.ready.try_acquire() {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => {
                self.ready
                    .acquire()
                    .await
                    .expect("semaphore never closed")
                    .forget();
                false
            }
        };
        let ticket = lock(&self.queue)
            .pop_front()
            .expect("a permit means a queued entry");
        (ticket, queued)
    }
}

/// Open loop: calls are due at a fixed `rate` (calls/s) whatever the target
/// does, as with many independent users, and `callers` are the connections
/// free to make them; calls in the first `warmup` are not counted. A
/// dispatcher thread queues each call when due (std's sleep has tens of
/// microseconds of precision where tokio's timer has a millisecond, which
/// would bunch calls into bursts), and a free caller, a task of its own
/// waiting on the queue, takes it. Its latency runs from when it was due,
/// waiting for the dispatcher and for a free caller included, so a
/// stalled target is charged for the calls that queue behind it (no
/// coordinated omission). Until session 40 it ran from when the
/// dispatcher queued it, which left out the dispatcher's own lateness (a
/// p99 of 0.2-0.5 ms on the 2-core VM, more for a busy target); that
/// lateness is still reported apart, as the harness's share. The
/// callers are started once and wait on the queue, each counting its own
/// calls. With a task spawned per call instead (its future allocated and
/// moved in, a shared lock per outcome), one node at 80,000 calls/s read
/// p999 2.8-6.9 ms against 0.94-2.2 this way, for the same harness CPU.
pub async fn drive_open<C: Caller>(
    callers: Vec<C>,
    rate: f64,
    warmup: Duration,
    measure: Duration,
) -> OpenMeasurement {
    let n_callers = callers.len();
    let due = Arc::new(Due {
        queue: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(4096)),
        ready: Semaphore::new(0),
    });
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|c| tokio::spawn(open_caller(c, due.clone())))
        .collect();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let dispatcher = {
        let due = due.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let (from, until) = (start + warmup, start + warmup + measure);
            let mut late_us = new_histogram();
            let mut k: u32 = 0;
            let mut batch = Vec::with_capacity(1024);
            loop {
                let now = Instant::now();
                // Every call due by now, queued together.
                loop {
                    let at = start + interval * k;
                    if at > now || at >= until {
                        break;
                    }
                    let counted = at >= from;
                    if counted {
                        late_us.saturating_record(micros(now - at));
                    }
                    batch.push(Ticket::Call { due: at, counted });
                    k += 1;
                }
                due.push(batch.drain(..));
                let next = start + interval * k;
                if next >= until {
                    break;
                }
                // At high rates, wake once per MIN_SLEEP and queue what fell
                // due meanwhile: a sleep per call would cost the harness more
                // CPU than the calls (its lateness is measured above either
                // way).
                std::thread::sleep((next - now).max(MIN_SLEEP));
            }
            due.push((0..n_callers).map(|_| Ticket::Stop));
            late_us
        })
    };
    let dispatch_late_us = match tokio::task::spawn_blocking(move || dispatcher.join()).await {
        Ok(Ok(h)) => h,
        _ => new_histogram(),
    };
    let mut m = Measurement::empty();
    let mut behind = 0;
    for t in tasks {
        match t.await {
            Ok((one, b)) => {
                m.merge(one);
                behind += b;
            }
            Err(e) => {
                m.errors += 1;
                *m.error_kinds
                    .entry(format!("caller task failed: {e}"))
                    .or_default() += 1;
            }
        }
    }
    m.seconds = measure.as_secs_f64();
    OpenMeasurement {
        offered_per_s: rate,
        m,
        behind,
        dispatch_late_us,
    }
}

/// One caller of an open-loop run: takes queued calls until its stop, and
/// returns what its counted calls measured and how many of them had waited
/// for a free caller.
async fn open_caller<C: Caller>(mut caller: C, due: Arc<Due>) -> (Measurement, u64) {
    let mut m = Measurement::empty();
    let mut behind = 0;
    loop {
        let (ticket, queued) = due.take().await;
        let Ticket::Call {
            due: due_at,
            counted,
        } = ticket
        else {
            break;
        };
        let result = match tokio::time::timeout(CALL_TIMEOUT, caller.call()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        if counted {
            m.record(result, due_at.elapsed());
            behind += u64::from(queued);
        }
    }
    (m, behind)
}

/// Locks a mutex whose holders never panic while holding it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros().max(1)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after 1 ms; every third call fails.
    struct Fake(u64);

    impl Caller for Fake {
        async fn call(&mut self) -> Result<Done, String> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.0 += 1;
            if self.0.is_multiple_of(3) {
                Err("boom".into())
            } else {
                Ok(Done {
                    numbers: 2,
                    retries: 0,
                })
            }
        }
    }

    #[tokio::test]
    async fn counts_calls_numbers_and_errors_in_the_window() {
        let m = drive(
            vec![Fake(0), Fake(0)],
            Duration::from_millis(50),
            Duration::from_millis(200),
        )
        .await;
        assert!(m.calls > 20, "calls {}", m.calls);
        assert_eq!(m.numbers, 2 * m.calls);
        assert!(m.errors > 0);
        assert_eq!(m.error_kinds.get("boom"), Some(&m.errors));
        assert!(m.quantile_ms(0.5) >= 1.0);
        assert_eq!(m.seconds, 0.2);
    }

    /// A call count is made exactly, by all callers together, after the
    /// warm-up, and its seconds are the time those calls took.
    #[tokio::test]
    async fn a_call_count_is_made_exactly_after_the_warm_up() {
        let callers = (0..4).map(|_| Fake(0)).collect();
        let started = Instant::now();
        let m = drive_count(callers, Duration::from_millis(30), 300).await;
        assert_eq!(m.calls + m.errors, 300);
        assert_eq!(m.numbers, 2 * m.calls);
        assert_eq!(m.error_kinds.get("boom"), Some(&m.errors));
        // 300 calls of at least 1 ms over four callers.
        assert!(m.seconds >= 0.075, "seconds {}", m.seconds);
        assert!(started.elapsed().as_secs_f64() >= 0.03 + m.seconds);
    }

    /// Answers after 1 ms, except that its `stall_at`-th call takes 300 ms.
    struct Staller {
        calls: Arc<AtomicU64>,
        stall_at: u64,
    }

    impl Caller for Staller {
        async fn call(&mut self) -> Result<Done, String> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let ms = if n == self.stall_at { 300 } else { 1 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Done {
                numbers: 1,
                retries: 0,
            })
        }
    }

    fn stallers(n: usize, stall_at: u64) -> Vec<Staller> {
        let calls = Arc::new(AtomicU64::new(0));
        (0..n)
            .map(|_| Staller {
                calls: calls.clone(),
                stall_at,
            })
            .collect()
    }

    #[tokio::test]
    async fn open_loop_sends_at_the_rate_asked_whatever_the_latency() {
        let o = drive_open(
            stallers(4, u64::MAX),
            400.0,
            Duration::from_millis(100),
            Duration::from_millis(500),
        )
        .await;
        // 400/s over 0.5 s: exactly the 200 calls due in the window.
        assert_eq!(o.m.calls, 200);
        assert_eq!(o.m.errors, 0);
        // A call every 2.5 ms, each taking 1 ms: a caller is always free.
        assert_eq!(o.behind, 0);
        assert_eq!(o.offered_per_s, 400.0);
        assert!(o.m.quantile_ms(0.5) >= 1.0);
        assert!(
            o.m.quantile_ms(0.99) < 100.0,
            "p99 {}",
            o.m.quantile_ms(0.99)
        );
    }

    #[tokio::test]
    async fn open_loop_charges_a_stall_to_the_calls_queued_behind_it() {
        // One caller at 200/s: the 300 ms stall holds up ~60 calls that were
        // due meanwhile. A closed loop would see one slow call; the open loop
        // must see every queued call wait.
        let o = drive_open(
            stallers(1, 40),
            200.0,
            Duration::from_millis(50),
            Duration::from_millis(1000),
        )
        .await;
        assert_eq!(o.m.calls, 200);
        assert!(o.behind >= 50, "behind {}", o.behind);
        assert!(o.m.max_ms() >= 300.0, "max {}", o.m.max_ms());
        // ~60 of 200 calls queued behind the stall: p90 is far above 1 ms.
        let p90 = o.m.quantile_ms(0.90);
        assert!(p90 >= 50.0, "p90 {p90}");
    }
}
