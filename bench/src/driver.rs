//! Closed-loop load: N callers, each with one call in flight, for a warm-up
//! and then a measured window. Only calls that complete inside the window
//! count, so throughput is completions per second of the window.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

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
    fn empty() -> Self {
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

    /// Latency at quantile `q`, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }
}

/// Runs every caller concurrently for `warmup` + `measure`.
pub async fn drive<C: Caller>(callers: Vec<C>, warmup: Duration, measure: Duration) -> Measurement {
    let start = Instant::now();
    let window = (start + warmup, start + warmup + measure);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|c| tokio::spawn(caller_loop(c, window)))
        .collect();
    let mut total = Measurement::empty();
    for t in tasks {
        match t.await {
            Ok(m) => total.merge(m),
            Err(e) => {
                total.errors += 1;
                *total
                    .error_kinds
                    .entry(format!("caller task failed: {e}"))
                    .or_default() += 1;
            }
        }
    }
    total.seconds = measure.as_secs_f64();
    total
}

async fn caller_loop<C: Caller>(mut c: C, (from, until): (Instant, Instant)) -> Measurement {
    let mut m = Measurement::empty();
    loop {
        let t0 = Instant::now();
        if t0 >= until {
            break;
        }
        let result = match tokio::time::timeout(CALL_TIMEOUT, c.call()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        let t1 = Instant::now();
        let counted = t1 >= from && t1 <= until;
        match result {
            Ok(done) if counted => {
                m.calls += 1;
                m.numbers += done.numbers;
                m.retries += u64::from(done.retries);
                let us = (t1 - t0).as_micros().max(1);
                m.latency_us
                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
            }
            Ok(_) => {}
            Err(e) => {
                if counted {
                    m.errors += 1;
                    if m.error_kinds.len() < MAX_ERROR_KINDS || m.error_kinds.contains_key(&e) {
                        *m.error_kinds.entry(e).or_default() += 1;
                    }
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    m
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
}
