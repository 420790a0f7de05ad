//! What the benches share.

use seqd::core::{Mode, NamespaceSpec, Namespaces, MAX_SEQUENCE};

/// One segmented namespace, "conv", forgetting keys after the default ten
/// idle minutes.
pub fn namespaces() -> Namespaces {
    Namespaces::new(vec![NamespaceSpec {
        name: "conv".into(),
        mode: Mode::Segmented,
        step_min: 1_000,
        step_max: 1_000_000,
        refill_interval_ms: 1_000,
        max_count: 10_000,
        max_key_bytes: 256,
        max_value: MAX_SEQUENCE,
        forget_idle_ms: 600_000,
    }])
}
