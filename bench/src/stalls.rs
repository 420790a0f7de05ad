//! The machine's own stalls over a measured window, apart from any target's.
//!
//! A thread sleeps [`TICK`] at a time and records how late it wakes. Where
//! the harness may (root, or `CAP_SYS_NICE`), the thread runs at the lowest
//! real-time priority: it then preempts every ordinary thread, so lateness
//! beyond the timer's own (tens of microseconds) means that no CPU could run
//! anything, the kernel running a section it does not preempt (the 2-core
//! VM's kernel runs `preempt=none`) or the hypervisor having taken the
//! virtual CPUs. A call's latency cannot be shorter than such a stall that
//! fell inside it, whatever the target does: a row whose tail matches the
//! machine's stall measured the machine. Without a real-time priority the
//! thread competes with the others and its lateness includes theirs; the
//! report says which it was. The cost: a thousand wake-ups a second, about
//! 1.5 % of a core (a C program doing the same: 0.16 s of CPU in 10 s).

use std::time::{Duration, Instant};

use serde::Serialize;

/// How long the thread sleeps between looks at the clock.
const TICK: Duration = Duration::from_millis(1);
/// Lateness from here on counts as a stall.
const STALL: Duration = Duration::from_millis(1);

/// What the thread saw over one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stalls {
    /// The thread ran at a real-time priority (see the module docs).
    pub realtime: bool,
    /// Times it woke.
    pub wakes: u64,
    /// Wakes at least [`STALL`] late.
    pub stalls: u64,
    /// The latest wake, in ms past when it was due.
    pub max_ms: f64,
    /// The stalls' lateness added up, in ms.
    pub stalled_ms: f64,
}

impl Stalls {
    /// Counts one wake, `late` past when it was due.
    fn wake(&mut self, late: Duration) {
        self.wakes += 1;
        let ms = late.as_secs_f64() * 1e3;
        self.max_ms = self.max_ms.max(ms);
        if late >= STALL {
            self.stalls += 1;
            self.stalled_ms += ms;
        }
    }
}

/// Measures the machine's stalls over the window a driver measures in
/// (`warmup` from now, `measure` long); start it together with the driver.
/// None if no thread could be started.
pub async fn over(warmup: Duration, measure: Duration) -> Option<Stalls> {
    let meter = std::thread::Builder::new()
        .name("stall-meter".into())
        .spawn(move || {
            let realtime = set_realtime();
            std::thread::sleep(warmup);
            let end = Instant::now() + measure;
            let mut seen = Stalls {
                realtime,
                ..Stalls::default()
            };
            loop {
                let before = Instant::now();
                if before >= end {
                    return seen;
                }
                std::thread::sleep(TICK);
                seen.wake(before.elapsed().saturating_sub(TICK));
            }
        })
        .ok()?;
    tokio::task::spawn_blocking(move || meter.join().ok())
        .await
        .ok()
        .flatten()
}

/// Moves the calling thread (only it) to the lowest real-time priority;
/// whether that worked.
fn set_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // names the calling thread, and the call changes nothing else.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_counts_as_a_stall_from_a_millisecond_late() {
        let mut s = Stalls::default();
        for late_us in [30, 999, 1_000, 17_500, 40] {
            s.wake(Duration::from_micros(late_us));
        }
        assert_eq!((s.wakes, s.stalls), (5, 2));
        assert_eq!(s.max_ms, 17.5);
        assert_eq!(s.stalled_ms, 18.5);
    }

    /// The thread wakes about once a tick over the window and reports
    /// nothing from before it (a loose bound: on a busy machine a thread
    /// that is not real-time wakes less often).
    #[tokio::test]
    async fn the_meter_wakes_through_the_window_and_stops_at_its_end() {
        let started = Instant::now();
        let s = over(Duration::from_millis(100), Duration::from_millis(200))
            .await
            .expect("a thread starts");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            (20..=200).contains(&s.wakes),
            "{} wakes in 200 ms of 1 ms sleeps",
            s.wakes
        );
        assert!(s.max_ms >= 0.0 && s.stalled_ms <= 200.0, "{s:?}");
    }
}
