//! Wall-clock time, injectable so tests can move a node's clock without
//! touching the machine's.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as this node believes them.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock plus an adjustable offset. The offset is 0 in
/// production; tests set it (through a test-only setting) to step a node's
/// clock back or forward.
#[derive(Debug, Default)]
pub struct SystemClock {
    offset_ms: AtomicI64,
}

impl SystemClock {
    pub fn new(offset_ms: i64) -> Self {
        Self {
            offset_ms: AtomicI64::new(offset_ms),
        }
    }

    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
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
}

/// A clock that only moves when told to, for unit tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    pub fn new(now_ms: u64) -> Self {
        Self {
            now: AtomicI64::new(now_ms as i64),
        }
    }

    pub fn set(&self, now_ms: u64) {
        self.now.store(now_ms as i64, Ordering::Relaxed);
    }

    pub fn advance(&self, delta_ms: i64) {
        self.now.fetch_add(delta_ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::Relaxed).max(0) as u64
    }
}
