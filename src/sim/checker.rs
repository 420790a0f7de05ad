//! The invariant checker the simulation runs after every step.
//!
//! Calls are recorded in completion order, so each new completion is checked
//! against everything completed before it: I1 (no number twice per key), I2
//! (a call that started after another completed gets greater numbers) and I5
//! (IDs unique; each node's IDs only go up).

use std::collections::{BTreeMap, HashMap, HashSet};

/// Completed calls and issued IDs, with every violation found so far.
#[derive(Debug, Default)]
pub struct Checker {
    keys: HashMap<String, KeyHistory>,
    ids: HashSet<u64>,
    last_id: HashMap<u64, u64>,
    violations: Vec<String>,
    calls: u64,
    numbers: u64,
    id_count: u64,
}

#[derive(Debug, Default)]
struct KeyHistory {
    /// Every range handed out: first → last.
    ranges: BTreeMap<u64, u64>,
    /// (completion time, highest number completed up to then), in
    /// completion order.
    done: Vec<(u64, u64)>,
}

impl Checker {
    /// Records a completed call that returned `first..=last` for `key`.
    /// Completions must be recorded in order of `completed`.
    pub fn record_call(&mut self, key: &str, invoked: u64, completed: u64, first: u64, last: u64) {
        self.calls += 1;
        self.numbers += last - first + 1;
        let h = self.keys.entry(key.to_string()).or_default();
        // I1: the range overlaps no earlier one.
        let below = h.ranges.range(..=last).next_back();
        if let Some((&f, &l)) = below {
            if l >= first {
                self.violations.push(format!(
                    "I1: key {key}: [{first}, {last}] (completed at {completed} ms) overlaps [{f}, {l}] handed out earlier"
                ));
            }
        }
        h.ranges.insert(first, last);
        // I2: everything completed strictly before this call started is
        // below its first number.
        let before = h.done.partition_point(|(t, _)| *t < invoked);
        if before > 0 {
            let (t, max) = h.done[before - 1];
            if max >= first {
                self.violations.push(format!(
                    "I2: key {key}: a call started at {invoked} ms got [{first}, {last}], but {max} was returned by {t} ms"
                ));
            }
        }
        let max = h.done.last().map_or(last, |(_, m)| (*m).max(last));
        h.done.push((completed, max));
    }

    /// Records IDs a node issued in one call, in the order issued.
    pub fn record_ids(&mut self, node: u64, ids: &[u64]) {
        for &id in ids {
            self.id_count += 1;
            if !self.ids.insert(id) {
                self.violations
                    .push(format!("I5: id {id} from node {node} was issued before"));
            }
            let last = self.last_id.entry(node).or_insert(0);
            if id <= *last {
                self.violations.push(format!(
                    "I5: node {node} issued {id} after {last}: its IDs went backwards"
                ));
            }
            *last = id;
        }
    }

    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Completed calls (one per key of a batch).
    pub fn calls(&self) -> u64 {
        self.calls
    }

    pub fn numbers(&self) -> u64 {
        self.numbers
    }

    pub fn ids(&self) -> u64 {
        self.id_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_number_is_an_i1_violation() {
        let mut c = Checker::default();
        c.record_call("k", 0, 1, 1, 10);
        // Concurrent with the first (started before it completed), so only
        // the overlap is wrong.
        c.record_call("k", 0, 3, 10, 12);
        assert_eq!(c.violations().len(), 1);
        assert!(c.violations()[0].starts_with("I1"), "{:?}", c.violations());
    }

    #[test]
    fn a_smaller_number_after_a_completed_call_is_an_i2_violation() {
        let mut c = Checker::default();
        c.record_call("k", 0, 5, 100, 100);
        // Started after 5 ms, got a smaller (but fresh) number.
        c.record_call("k", 6, 7, 50, 50);
        assert_eq!(c.violations().len(), 1);
        assert!(c.violations()[0].starts_with("I2"), "{:?}", c.violations());
    }

    #[test]
    fn concurrent_calls_may_complete_in_any_order() {
        let mut c = Checker::default();
        c.record_call("k", 0, 5, 100, 100);
        // Started before the first completed: either order is linearizable.
        c.record_call("k", 4, 6, 50, 50);
        c.record_call("other", 7, 8, 1, 1);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
    }

    #[test]
    fn ids_must_be_unique_and_rise_per_node() {
        let mut c = Checker::default();
        c.record_ids(1, &[10, 11]);
        c.record_ids(2, &[11]);
        c.record_ids(1, &[9]);
        let v = c.violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("issued before") && v[1].contains("went backwards"));
    }
}
