//! Which followers a ReadIndex round asks.
//!
//! A round completes once a majority (the leader included) has acknowledged
//! its heartbeat; raft-rs counts the acknowledgements, whoever they come
//! from. Asking every follower makes the rest do the same work for nothing:
//! in a three-node cluster every round wakes a follower whose answer is never
//! needed. So rounds go to just enough followers: the ones that answered a
//! broadcast round first. A round that takes much longer than the fastest
//! one since that choice is sent to everyone again, as is one round in every
//! few hundred, and then the fastest answers choose anew.
//!
//! Safety does not depend on the choice (a round still needs a majority's
//! acknowledgements); only how soon a round completes does. Raft-rs's own
//! heartbeats, every heartbeat interval, go to every follower and carry the
//! newest pending round, so a chosen follower that went quiet costs at most
//! the resend delay, never a lost round.

use std::time::Duration;

/// A round is sent to everyone again once it has taken this many times as
/// long as a recent fast round (see `ReadPeers::baseline`) ...
const RESEND_FACTOR: u32 = 3;
/// ... but never sooner than this (a round on loopback takes a fraction of a
/// millisecond; a slower one should not flap between followers) ...
const RESEND_MIN: Duration = Duration::from_millis(2);
/// ... and never later than this.
const RESEND_MAX: Duration = Duration::from_millis(20);
/// Rounds sent to one choice before a round goes to everyone again, so a
/// chosen follower that slowed down gradually (never past the resend
/// limit) is still replaced by a faster one.
const REPROBE_EVERY: u32 = 256;

#[derive(Debug, Default)]
pub(crate) struct ReadPeers {
    /// Followers rounds go to; empty: every follower.
    chosen: Vec<u64>,
    /// Rounds sent to the current choice.
    sent_to_chosen: u32,
    /// A broadcast round's context and the voters that acknowledged it (or
    /// a later round), in the order they did.
    probe: Option<(u64, Vec<u64>)>,
    /// How long a fast round takes lately: the fastest completed round,
    /// forgotten slowly (it grows by 1/64 per completed round), so a
    /// follower that slows down step by step still runs into the limit,
    /// while one slow round does not raise it.
    baseline: Option<Duration>,
}

impl ReadPeers {
    /// Followers the round with context `ctx` should go to, or None for
    /// every follower. `followers` are the voters other than this leader;
    /// `needed` is how many of them make a majority with it.
    pub(crate) fn targets(&mut self, ctx: u64, followers: &[u64], needed: usize) -> Option<&[u64]> {
        if needed == 0 {
            // A single voter: raft-rs completes the round without messages.
            self.reset();
            return None;
        }
        let valid = self.chosen.len() == needed
            && self.chosen.iter().all(|id| followers.contains(id))
            && self.sent_to_chosen < REPROBE_EVERY;
        if valid {
            self.sent_to_chosen += 1;
            return Some(&self.chosen);
        }
        self.drop_choice();
        self.start_probe(ctx);
        None
    }

    /// Whether acknowledgements are being collected to choose followers
    /// (otherwise [`Self::on_ack`] has nothing to do).
    pub(crate) fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// A round (or raft-rs's heartbeat carrying the newest pending round)
    /// went to every follower: the first `needed` to answer become the
    /// chosen ones.
    fn start_probe(&mut self, ctx: u64) {
        if self.probe.is_none() {
            self.probe = Some((ctx, Vec::new()));
        }
    }

    fn drop_choice(&mut self) {
        self.chosen.clear();
        self.sent_to_chosen = 0;
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
            let mut chosen = std::mem::take(acked);
            chosen.truncate(needed);
            self.drop_choice();
            self.chosen = chosen;
            self.probe = None;
        }
    }

    /// A round completed after `took`.
    pub(crate) fn on_complete(&mut self, took: Duration) {
        self.baseline = Some(self.baseline.map_or(took, |b| took.min(b + b / 64)));
    }

    /// Follower `id` is unreachable (the transport says so): a choice with
    /// it in it is dropped, and the caller should send the pending round to
    /// everyone.
    pub(crate) fn forget(&mut self, id: u64) -> bool {
        if !self.chosen.contains(&id) {
            return false;
        }
        self.drop_choice();
        true
    }

    /// How long a round sent to the chosen followers may take before it
    /// goes to everyone (None: rounds go to everyone already).
    pub(crate) fn resend_after(&self) -> Option<Duration> {
        if self.chosen.is_empty() {
            return None;
        }
        Some(
            self.baseline
                .map_or(RESEND_MIN, |d| d * RESEND_FACTOR)
                .clamp(RESEND_MIN, RESEND_MAX),
        )
    }

    /// Whether the pending round, out for `age`, should go to everyone:
    /// then the choice is dropped and a probe starts with `ctx`, the pending
    /// round's context.
    pub(crate) fn resend(&mut self, age: Duration, ctx: u64) -> bool {
        if self.resend_after().is_none_or(|limit| age < limit) {
            return false;
        }
        self.drop_choice();
        self.probe = None;
        self.start_probe(ctx);
        true
    }

    /// Forgets everything (leadership gained or lost, or a configuration in
    /// which rounds go to everyone).
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
        assert_eq!(p.resend_after(), Some(2 * MS), "the 2 ms floor");
        assert_eq!(p.targets(2, &f, 1), Some(&[2][..]));
        assert!(!p.resend(MS, 2));
        assert!(p.resend(2 * MS, 2));
        assert!(!p.resend(30 * MS, 2), "once: it now goes to everyone");
        assert_eq!(p.resend_after(), None);
        assert_eq!(p.targets(3, &f, 1), None);
        p.on_ack(3, 2, &f, 1);
        assert_eq!(p.targets(4, &f, 1), Some(&[3][..]));
        // The limit follows a recent fast round, not the latest: one slow
        // round does not raise it, and it rises only slowly, so a follower
        // slowing down step by step still runs into it.
        let mut p = ReadPeers::default();
        p.targets(1, &f, 1);
        p.on_ack(3, 1, &f, 1);
        p.on_complete(5 * MS);
        assert_eq!(p.resend_after(), Some(15 * MS));
        p.on_complete(14 * MS);
        let limit = p.resend_after().unwrap();
        assert!(limit > 15 * MS && limit < 16 * MS, "{limit:?}");
        let mut took = 5 * MS;
        let mut rounds = 0;
        while !p.resend(took, 4) {
            assert_eq!(p.targets(4, &f, 1), Some(&[3][..]));
            p.on_complete(took);
            took = took * 11 / 10; // 10% slower each round
            rounds += 1;
        }
        assert!(rounds < 20, "caught after {rounds} rounds");
        // At most 20 ms.
        let mut p = ReadPeers::default();
        p.targets(1, &f, 1);
        p.on_ack(3, 1, &f, 1);
        p.on_complete(100 * MS);
        assert_eq!(p.resend_after(), Some(20 * MS));
    }

    #[test]
    fn a_choice_is_asked_again_after_a_while_or_when_unreachable() {
        let mut p = ReadPeers::default();
        let f = [2, 3];
        p.targets(1, &f, 1);
        p.on_ack(2, 1, &f, 1);
        for ctx in 2..2 + u64::from(REPROBE_EVERY) {
            assert_eq!(p.targets(ctx, &f, 1), Some(&[2][..]));
        }
        assert_eq!(p.targets(1000, &f, 1), None, "re-probed");
        assert!(p.probing());
        p.on_ack(3, 1000, &f, 1);
        assert!(!p.probing());
        assert_eq!(p.targets(1001, &f, 1), Some(&[3][..]));
        assert!(!p.forget(2), "not chosen");
        assert!(p.forget(3));
        assert_eq!(p.targets(1002, &f, 1), None);
    }

    #[test]
    fn a_probe_chooses_no_more_than_needed_and_none_for_one_voter() {
        let mut p = ReadPeers::default();
        let five = [2, 3, 4, 5];
        p.targets(1, &five, 2);
        p.on_ack(2, 1, &five, 2);
        // The cluster shrank to three voters meanwhile.
        p.on_ack(3, 1, &[2, 3], 1);
        assert_eq!(p.targets(2, &[2, 3], 1), Some(&[2][..]));
        let mut p = ReadPeers::default();
        assert_eq!(p.targets(1, &[], 0), None);
        assert!(!p.probing(), "nothing to choose with one voter");
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
