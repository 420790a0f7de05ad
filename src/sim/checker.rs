//! The invariant checker the simulation runs after every step.
//!
//! Calls are recorded in completion order, so each new completion is checked
//! against everything completed before it: I1 (no number twice per key), I2
//! (a call that started after another completed gets greater numbers) and I5
//! (IDs unique; each node's IDs only go up).
//!
//! Ranges no client saw (answered after the client had given up, or lost
//! on their way) are recorded too (for I1, and as numbers that were handed
//! out), and at the end
//! [`Checker::check_epochs`] checks the epoch's promise over every range:
//! numbers skipped between two handed out (a hole) come with a new epoch,
//! and epochs only go up with the numbers. One exception, which the
//! epoch's documentation states: a retry answered from its request id's
//! record after its epoch ended (a later leader answered it) carries the
//! epoch its numbers came in, and may sit just above that epoch's numbers
//! that were never answered (calls that failed in the take-over after their
//! raise committed); no hole just below such a range is held against the
//! epoch.

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
    unobserved: u64,
    holes: u64,
    holes_beside_late: u64,
    /// Every distinct answer to each request id.
    requests: HashMap<String, Vec<RequestAnswer>>,
}

/// An answer to a request id: one range (first, last) per key, the epoch,
/// and whether an answer with these ranges not marked replayed (the
/// allocation's own) has been seen.
type RequestAnswer = (Vec<(u64, u64)>, u64, bool);

/// What an answer to a request id was, against the answers before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The id's first answer.
    First,
    /// The same ranges as an answer before.
    Repeat,
    /// Other ranges than before.
    Fresh,
}

/// The epoch every key starts in: the first leader's start-of-term entry
/// opens it, and a key's numbers start at 1.
const FIRST_EPOCH: u64 = 1;

#[derive(Debug, Default)]
struct KeyHistory {
    /// Every range handed out: first → (last, epoch).
    ranges: BTreeMap<u64, (u64, u64)>,
    /// The first numbers of ranges answered after their epoch ended.
    late: HashSet<u64>,
    /// (completion time, highest number completed up to then), in
    /// completion order.
    done: Vec<(u64, u64)>,
}

impl Checker {
    /// Records a completed call that returned `first..=last` for `key`
    /// under `epoch`. Completions must be recorded in order of `completed`.
    pub fn record_call(
        &mut self,
        key: &str,
        (invoked, completed): (u64, u64),
        (first, last): (u64, u64),
        epoch: u64,
    ) {
        self.numbers += last - first + 1;
        self.record_range(key, first, last, epoch, completed);
        self.record_completion(key, (invoked, completed), (first, last));
    }

    /// Records a call completed at `completed` with a range recorded
    /// before, and checks it for I2 (alone: for a retry answered with what
    /// its request id got before).
    pub fn record_completion(
        &mut self,
        key: &str,
        (invoked, completed): (u64, u64),
        (first, last): (u64, u64),
    ) {
        self.calls += 1;
        let h = self.keys.entry(key.to_string()).or_default();
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

    /// Records what a node answered to `request_id` (at `at`; one range per
    /// key of the call; `replayed` as the answer said) and tells whether
    /// the call's ranges are new. A dense call's answers must all be the
    /// same (its record goes through the log); a segmented call's record
    /// lives in its leader's memory, so after a leader change a retry may
    /// get new numbers.
    pub fn record_request(
        &mut self,
        request_id: &str,
        dense: bool,
        ranges: &[(u64, u64)],
        (epoch, replayed): (u64, bool),
        at: u64,
    ) -> Answer {
        let answers = self.requests.entry(request_id.to_string()).or_default();
        if let Some((_, before, allocated)) = answers.iter_mut().find(|(r, _, _)| r == ranges) {
            // The same answer again, epoch and all: the epoch a frontend
            // stamps must not depend on which attempt got through.
            if *before != epoch {
                self.violations.push(format!(
                    "idempotency: request {request_id} got {ranges:?} in epoch {epoch} at {at} ms, \
                     as before but in epoch {before}"
                ));
            }
            // Ranges handed out again can only come from the record, and
            // the answer must say so: a frontend reads a hole below it
            // differently. One answer is the allocation's own, not
            // replayed, and it may be seen after a retry's (a retry that
            // waited on the same raise is answered with it).
            if !replayed {
                if *allocated {
                    self.violations.push(format!(
                        "idempotency: request {request_id} got {ranges:?} at {at} ms, as before, \
                         and neither answer was marked replayed"
                    ));
                }
                *allocated = true;
            }
            return Answer::Repeat;
        }
        if let (true, Some((first, first_epoch, _))) = (dense, answers.first()) {
            self.violations.push(format!(
                "idempotency: request {request_id} (dense) got {ranges:?} in epoch {epoch} at {at} ms, \
                 but {first:?} in epoch {first_epoch} before"
            ));
        }
        let fresh = if answers.is_empty() {
            Answer::First
        } else {
            Answer::Fresh
        };
        answers.push((ranges.to_vec(), epoch, !replayed));
        fresh
    }

    /// A first attempt was answered as replayed: request ids are never
    /// reused, so there was no record to answer it from.
    pub fn replayed_first_attempt(&mut self, request_id: &str, at: u64) {
        self.violations.push(format!(
            "idempotency: request {request_id}'s first attempt was answered as replayed at {at} ms"
        ));
    }

    /// Marks the range of `key` starting at `first`, recorded before, as
    /// answered after its epoch ended (by a node in a later epoch).
    pub fn mark_late(&mut self, key: &str, first: u64) {
        self.keys
            .entry(key.to_string())
            .or_default()
            .late
            .insert(first);
    }

    /// A violation the simulation saw itself.
    pub fn report(&mut self, violation: String) {
        self.violations.push(violation);
    }

    /// Records a range a node handed out at `at` that no client saw (its
    /// client had given up, or the answer was lost): the numbers are spent
    /// (I1, and no hole), and no order is claimed for them (I2).
    pub fn record_unobserved(&mut self, key: &str, at: u64, (first, last): (u64, u64), epoch: u64) {
        self.unobserved += 1;
        self.record_range(key, first, last, epoch, at);
    }

    /// I1: the range overlaps none handed out before.
    fn record_range(&mut self, key: &str, first: u64, last: u64, epoch: u64, at: u64) {
        let h = self.keys.entry(key.to_string()).or_default();
        let below = h.ranges.range(..=last).next_back();
        if let Some((&f, &(l, _))) = below {
            if l >= first {
                self.violations.push(format!(
                    "I1: key {key}: [{first}, {last}] (handed out at {at} ms) overlaps [{f}, {l}] handed out earlier"
                ));
            }
        }
        h.ranges.insert(first, (last, epoch));
    }

    /// The epoch's promise, over every range handed out (call it once,
    /// after the run): between two ranges of a key, in number order,
    /// numbers never handed out come with a change of epoch (a frontend
    /// that sees the same epoch knows nothing is missing), and the epoch
    /// never goes down as the numbers go up. A key's numbers start at 1
    /// in `FIRST_EPOCH`.
    pub fn check_epochs(&mut self) {
        let mut keys: Vec<&String> = self.keys.keys().collect();
        keys.sort();
        for key in keys {
            let h = &self.keys[key];
            let mut prev = (0, FIRST_EPOCH);
            for (&first, &(last, epoch)) in &h.ranges {
                let (prev_last, prev_epoch) = prev;
                let late = h.late.contains(&first);
                if epoch < prev_epoch {
                    self.violations.push(format!(
                        "epoch: key {key}: [{first}, {last}] came in epoch {epoch}, after {prev_last} in epoch {prev_epoch}"
                    ));
                }
                if first > prev_last + 1 {
                    self.holes += 1;
                    // Only the hole below a late range: above it, the
                    // numbers of its epoch that no call got end where a
                    // new epoch begins (raises apply in order, and calls
                    // failed with their raise in flight are followed by a
                    // new start, which opens one).
                    if epoch == prev_epoch && late {
                        self.holes_beside_late += 1;
                    } else if epoch == prev_epoch {
                        self.violations.push(format!(
                            "hole: key {key}: {}..={} were never handed out, yet [{first}, {last}] came in epoch {epoch}, as {prev_last} did",
                            prev_last + 1,
                            first - 1
                        ));
                    }
                }
                prev = (last, epoch);
            }
        }
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

    /// Ranges handed out to calls whose client had given up.
    pub fn unobserved(&self) -> u64 {
        self.unobserved
    }

    /// Holes [`Checker::check_epochs`] found (each announced or a
    /// violation).
    pub fn holes(&self) -> u64 {
        self.holes
    }

    /// Of those, the holes under one epoch just below a range answered
    /// after its epoch ended (allowed).
    pub fn holes_beside_late(&self) -> u64 {
        self.holes_beside_late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_number_is_an_i1_violation() {
        let mut c = Checker::default();
        c.record_call("k", (0, 1), (1, 10), 1);
        // Concurrent with the first (started before it completed), so only
        // the overlap is wrong.
        c.record_call("k", (0, 3), (10, 12), 1);
        assert_eq!(c.violations().len(), 1);
        assert!(c.violations()[0].starts_with("I1"), "{:?}", c.violations());
    }

    #[test]
    fn a_smaller_number_after_a_completed_call_is_an_i2_violation() {
        let mut c = Checker::default();
        c.record_call("k", (0, 5), (100, 100), 1);
        // Started after 5 ms, got a smaller (but fresh) number.
        c.record_call("k", (6, 7), (50, 50), 1);
        assert_eq!(c.violations().len(), 1);
        assert!(c.violations()[0].starts_with("I2"), "{:?}", c.violations());
    }

    #[test]
    fn concurrent_calls_may_complete_in_any_order() {
        let mut c = Checker::default();
        c.record_call("k", (0, 5), (100, 100), 1);
        // Started before the first completed: either order is linearizable.
        c.record_call("k", (4, 6), (50, 50), 1);
        c.record_call("other", (7, 8), (1, 1), 1);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
    }

    #[test]
    fn a_hole_within_one_epoch_is_a_violation() {
        let mut c = Checker::default();
        c.record_call("k", (0, 1), (1, 4), 1);
        // 5..=9 were never handed out, and the epoch did not say so.
        c.record_call("k", (2, 3), (10, 10), 1);
        // A hole with a new epoch is announced; a number handed out to a
        // client that had given up fills its place.
        c.record_call("k", (4, 5), (20, 21), 2);
        c.record_unobserved("k", 6, (22, 22), 2);
        c.record_call("k", (7, 8), (23, 23), 2);
        // A key whose first numbers were skipped in the first epoch.
        c.record_call("late", (0, 1), (3, 3), 1);
        c.check_epochs();
        let v = c.violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("hole: key k: 5..=9"), "{v:?}");
        assert!(v[1].starts_with("hole: key late: 1..=2"), "{v:?}");
        assert_eq!(c.holes(), 3);
        assert_eq!(c.unobserved(), 1);
    }

    #[test]
    fn a_hole_beside_a_range_answered_after_its_epoch_ended_is_allowed() {
        let mut c = Checker::default();
        c.record_call("k", (0, 1), (1, 4), 1);
        // 5 was reserved in epoch 1 and never answered; 6 was, to a retry
        // after the take-over, from its request id's record.
        c.record_call("k", (2, 9), (6, 6), 1);
        c.mark_late("k", 6);
        // 7 was never answered either; the new leader goes on at 8.
        c.record_call("k", (10, 11), (8, 8), 2);
        // Not beside a late range: still a violation.
        c.record_call("k", (12, 13), (10, 10), 2);
        // Above a late range, under its epoch: a violation too.
        c.record_call("j", (0, 1), (1, 1), 1);
        c.record_call("j", (2, 9), (2, 2), 1);
        c.mark_late("j", 2);
        c.record_call("j", (10, 11), (4, 4), 1);
        c.check_epochs();
        let v = c.violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("hole: key j: 3..=3"), "{v:?}");
        assert!(v[1].starts_with("hole: key k: 9..=9"), "{v:?}");
        assert_eq!((c.holes(), c.holes_beside_late()), (4, 1));
    }

    #[test]
    fn an_epoch_that_goes_down_as_the_numbers_go_up_is_a_violation() {
        let mut c = Checker::default();
        c.record_call("k", (0, 1), (1, 1), 3);
        c.record_call("k", (2, 3), (2, 2), 2);
        c.check_epochs();
        let v = c.violations();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("epoch: key k"), "{v:?}");
    }

    #[test]
    fn a_request_answered_again_must_get_the_same_ranges_and_epoch_marked_replayed() {
        let mut c = Checker::default();
        let r = |c: &mut Checker, id, dense, range, answer, at| {
            c.record_request(id, dense, &[range], answer, at)
        };
        assert_eq!(r(&mut c, "r", true, (1, 2), (1, false), 0), Answer::First);
        assert_eq!(r(&mut c, "r", true, (1, 2), (1, true), 5), Answer::Repeat);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        assert_eq!(r(&mut c, "r", true, (1, 2), (2, true), 6), Answer::Repeat);
        assert_eq!(r(&mut c, "r", true, (3, 4), (2, false), 7), Answer::Fresh);
        // A segmented id may get new numbers (another leader's memory).
        assert_eq!(r(&mut c, "s", false, (1, 2), (1, false), 0), Answer::First);
        assert_eq!(r(&mut c, "s", false, (5, 6), (2, false), 9), Answer::Fresh);
        // The allocation's own answer may come after a retry's replay ...
        assert_eq!(r(&mut c, "t", true, (7, 8), (2, true), 11), Answer::First);
        assert_eq!(r(&mut c, "t", true, (7, 8), (2, false), 11), Answer::Repeat);
        assert_eq!(c.violations().len(), 2, "{:?}", c.violations());
        // ... but only one answer with the same ranges is not a replay.
        assert_eq!(
            r(&mut c, "s", false, (5, 6), (2, false), 10),
            Answer::Repeat
        );
        let v = c.violations();
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(v[0].contains("as before but in epoch 1"), "{v:?}");
        assert!(v[1].contains("(dense) got [(3, 4)]"), "{v:?}");
        assert!(v[2].contains("neither answer was marked replayed"), "{v:?}");
    }

    #[test]
    fn an_unobserved_range_is_checked_for_duplicates() {
        let mut c = Checker::default();
        c.record_call("k", (0, 1), (1, 4), 1);
        c.record_unobserved("k", 2, (4, 5), 1);
        assert_eq!(c.violations().len(), 1);
        assert!(c.violations()[0].starts_with("I1"), "{:?}", c.violations());
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
