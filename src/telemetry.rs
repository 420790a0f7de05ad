//! Logging set-up: `tracing` with the level from `SEQD_LOG` (or `RUST_LOG`),
//! text or JSON lines; and a throttle for lines that would repeat.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Says when to log a line about one peer or member again: at most once
/// per period for each. The conditions behind such lines (a peer refused,
/// a member without an address) hold for every message, hundreds a second,
/// and a line for each would bury the log.
#[derive(Debug)]
pub(crate) struct LogEvery {
    every: Duration,
    last: HashMap<u64, Instant>,
}

impl LogEvery {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: HashMap::new(),
        }
    }

    /// Whether to log about `key` at `now`; if so, the period starts again.
    pub(crate) fn due(&mut self, key: u64, now: Instant) -> bool {
        let due = self
            .last
            .get(&key)
            .is_none_or(|at| now.duration_since(*at) >= self.every);
        if due {
            self.last.insert(key, now);
        }
        due
    }

    /// Forgets `key`: the next line about it is logged at once.
    pub(crate) fn forget(&mut self, key: u64) {
        self.last.remove(&key);
    }
}

/// Installs the global subscriber. Call once, at start-up.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("SEQD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,raft=warn,h2=warn,tower=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_due_once_per_period_for_each_key() {
        let every = Duration::from_secs(10);
        let mut log = LogEvery::new(every);
        let t0 = Instant::now();
        assert!(log.due(3, t0));
        assert!(!log.due(3, t0 + Duration::from_secs(9)));
        assert!(log.due(4, t0 + Duration::from_secs(9)));
        assert!(log.due(3, t0 + every));
        assert!(!log.due(3, t0 + every));
        log.forget(3);
        assert!(log.due(3, t0 + every));
    }
}
