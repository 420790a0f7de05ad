//! Wall-clock time, injectable so tests can move a node's clock without
//! touching the machine's.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A node's two clocks: the wall clock, which may jump, and a monotonic
/// clock, which never does and measures how far the wall clock jumped.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch, as this node believes them.
    fn now_ms(&self) -> u64;
    /// Milliseconds on a monotonic clock (only differences matter).
    fn mono_ms(&self) -> u64;
}

/// The system clock plus an adjustable offset. The offset is 0 in
/// production; tests set it (through a test-only setting) to step a node's
/// clock back or forward.
#[derive(Debug)]
pub struct SystemClock {
    offset_ms: AtomicI64,
    started: Instant,
}

impl SystemClock {
    pub fn new(offset_ms: i64) -> Self {
        Self {
            offset_ms: AtomicI64::new(offset_ms),
            started: Instant::now(),
        }
    }

    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        real.saturating_add(self.offset_ms()).max(0) as u64
    }

    fn mono_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}
