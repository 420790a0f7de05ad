//! Which followers a ReadIndex round asks.
//!
//! A round completes once a majority (the leader included) has acknowledged
//! its heartbeat; raft-rs counts the acknowledgements, whoever they come
//! from. Asking every follower makes the rest do the same work for nothing:
//! in a three-node cluster every round wakes a follower whose answer is never
//! needed. So rounds go to just enough followers: the ones that answered a
//! broadcast round first. A round that takes much longer than the previous
//! one is sent to everyone again, and then the fastest answers choose anew.
//!
//! Safety does not depend on the choice (a round still needs a majority's
//! acknowledgements); only how soon a round completes does. Raft-rs's own
//! heartbeats, every heartbeat interval, go to every follower and carry the
//! newest pending round, so a chosen follower that went quiet costs at most
//! the resend delay, never a lost round.

use std::time::Duration;

/// A round is sent to everyone again once it has taken this many times as
/// long as the previous round took ...
const RESEND_FACTOR: u32 = 3;
/// ... but never sooner than this (a round on loopback takes a fraction of a
/// millisecond; a slower one should not flap between followers) ...
const RESEND_MIN: Duration = Duration::from_millis(2);
/// ... and never later than this.
const RESEND_MAX: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub(crate) struct ReadPeers {
    /// Followers rounds go to; empty: every follower.
    chosen: Vec<u64>,
    /// A broadcast round's context and the voters that acknowledged it (or
    /// a later round), in the order they did.
    probe: Option<(u64, Vec<u64>)>,
    /// How long the last completed round took.
    last_round: Option<Duration>,
}

impl ReadPeers {
    /// Followers the round with context `ctx` should go to, or None for
    /// every follower. `followers` are the voters other than this leader;
    /// `needed` is how many of them make a majority with it.
    pub(crate) fn targets(&mut self, ctx: u64, followers: &[u64], needed: usize) -> Option<&[u64]> {
        let valid = needed > 0
            && self.chosen.len() == needed
            && self.chosen.iter().all(|id| followers.contains(id));
        if valid {
            return Some(&self.chosen);
        }
        self.chosen.clear();
        self.start_probe(ctx);
        None
    }

    /// A round (or raft-rs's heartbeat carrying the newest pending round)
    /// went to every follower: the first `needed` to answer become the
    /// chosen ones.
    fn start_probe(&mut self, ctx: u64) {
        if self.probe.is_none() {
            self.probe = Some((ctx, Vec::new()));
        }
    }

    /// Follower `from` acknowledged a round with context `ctx`.
    pub(crate) fn on_ack(&mut self, from: u64, ctx: u64, followers: &[u64], needed: usize) {
        let Some((probe_ctx, acked)) = &mut self.probe else {
            return;
        };
        // An acknowledgement of a later round also answers the probe's: it
        // was sent later.
        if ctx < *probe_ctx || !followers.contains(&from) || acked.contains(&from) {
            return;
        }
        acked.push(from);
        if acked.len() >= needed {
            self.chosen = std::mem::take(acked);
            self.probe = None;
        }
    }

    /// A round completed after `took`.
    pub(crate) fn on_complete(&mut self, took: Duration) {
        self.last_round = Some(took);
    }

    /// How long a round sent to the chosen followers may take before it
    /// goes to everyone (None: rounds go to everyone already).
    pub(crate) fn resend_after(&self) -> Option<Duration> {
        if self.chosen.is_empty() {
            return None;
        }
        Some(
            self.last_round
                .map_or(RESEND_MIN, |d| d * RESEND_FACTOR)
                .clamp(RESEND_MIN, RESEND_MAX),
        )
    }

    /// Whether a round out for `age` (sent to the chosen followers) should
    /// go to everyone: then the choice is dropped and a probe starts with
    /// `newest`, the newest pending round's context.
    pub(crate) fn resend(&mut self, age: Duration, newest: u64) -> bool {
        if self.resend_after().is_none_or(|limit| age < limit) {
            return false;
        }
        self.chosen.clear();
        self.probe = None;
        self.start_probe(newest);
        true
    }

    /// Forgets everything (leadership gained or lost).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The voters other than `leader`, and how many of them make a majority
/// with it; None in a joint configuration (two majorities to satisfy) or if
/// `leader` is not a voter: rounds then go to everyone.
pub(crate) fn followers_needed(
    leader: u64,
    incoming: impl IntoIterator<Item = u64>,
    joint: bool,
) -> Option<(Vec<u64>, usize)> {
    if joint {
        return None;
    }
    let voters: Vec<u64> = incoming.into_iter().collect();
    if !voters.contains(&leader) {
        return None;
    }
    let followers: Vec<u64> = voters.iter().copied().filter(|&v| v != leader).collect();
    // A majority of n voters is n / 2 + 1, the leader being one of them.
    Some((followers, voters.len() / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_to_answer_a_broadcast_are_chosen() {
        let mut p = ReadPeers::default();
        let f = [2, 3];
        assert_eq!(p.targets(1, &f, 1), None, "nothing known yet: everyone");
        p.on_ack(3, 1, &f, 1);
        p.on_ack(2, 1, &f, 1);
        assert_eq!(p.targets(2, &f, 1), Some(&[3][..]));
        // Five voters: two followers are needed, in answer order.
        let f = [2, 3, 4, 5];
        let mut p = ReadPeers::default();
        assert_eq!(p.targets(1, &f, 2), None);
        p.on_ack(5, 1, &f, 2);
        assert_eq!(p.targets(2, &f, 2), None, "still probing");
        p.on_ack(5, 2, &f, 2);
        p.on_ack(4, 2, &f, 2);
        assert_eq!(p.targets(3, &f, 2), Some(&[5, 4][..]));
    }

    #[test]
    fn stale_or_foreign_acks_do_not_choose() {
        let mut p = ReadPeers::default();
        let f = [2, 3];
        assert_eq!(p.targets(5, &f, 1), None);
        p.on_ack(2, 4, &f, 1);
        p.on_ack(9, 5, &f, 1);
        assert_eq!(
            p.targets(6, &f, 1),
            None,
            "an older round's ack and a non-voter's"
        );
        p.on_ack(3, 7, &f, 1);
        assert_eq!(
            p.targets(8, &f, 1),
            Some(&[3][..]),
            "a later round's ack counts"
        );
    }

    #[test]
    fn a_chosen_follower_that_left_the_voters_is_dropped() {
        let mut p = ReadPeers::default();
        assert_eq!(p.targets(1, &[2, 3], 1), None);
        p.on_ack(3, 1, &[2, 3], 1);
        assert_eq!(p.targets(2, &[2, 4], 1), None);
        p.on_ack(4, 2, &[2, 4], 1);
        assert_eq!(p.targets(3, &[2, 4], 1), Some(&[4][..]));
    }

    #[test]
    fn a_slow_round_goes_to_everyone_and_the_choice_starts_over() {
        let mut p = ReadPeers::default();
        let f = [2, 3];
        p.targets(1, &f, 1);
        p.on_ack(2, 1, &f, 1);
        p.on_complete(MS / 2);
        assert_eq!(p.targets(2, &f, 1), Some(&[2][..]));
        assert_eq!(p.resend_after(), Some(2 * MS));
        assert!(!p.resend(MS, 2), "under the 2 ms floor");
        assert!(p.resend(2 * MS, 2));
        assert!(!p.resend(30 * MS, 2), "once: it now goes to everyone");
        assert_eq!(p.resend_after(), None);
        assert_eq!(p.targets(3, &f, 1), None);
        p.on_ack(3, 2, &f, 1);
        assert_eq!(p.targets(4, &f, 1), Some(&[3][..]));
        // After slow rounds the limit follows them, up to 20 ms.
        p.on_complete(5 * MS);
        assert!(!p.resend(14 * MS, 4));
        assert!(p.resend(15 * MS, 4));
        p.targets(5, &f, 1);
        p.on_ack(3, 5, &f, 1);
        p.on_complete(100 * MS);
        assert!(p.resend(20 * MS, 6));
    }

    #[test]
    fn majorities() {
        assert_eq!(followers_needed(1, [1], false), Some((vec![], 0)));
        assert_eq!(followers_needed(1, [1, 2, 3], false), Some((vec![2, 3], 1)));
        assert_eq!(
            followers_needed(3, [1, 2, 3, 4], false).map(|x| x.1),
            Some(2)
        );
        assert_eq!(
            followers_needed(1, [1, 2, 3, 4, 5], false).map(|x| x.1),
            Some(2)
        );
        assert_eq!(followers_needed(1, [1, 2, 3], true), None);
        assert_eq!(followers_needed(9, [1, 2, 3], false), None);
    }
}
