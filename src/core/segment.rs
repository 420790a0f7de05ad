//! Per-key allocation from ceilings the Raft log has committed.
//!
//! Safety rests on two rules:
//! - a number is handed out only if it is at or below a ceiling that has been
//!   *applied* (so a majority has it on disk, I3), and
//! - a leader that starts serving, or that forgets a key, restarts the key at
//!   `committed ceiling + 1`, above anything any earlier leader could have
//!   handed out (I1), at the price of a hole.
//!
//! An idle key leaves memory without a hole by a release: its ceiling is
//! lowered through the log to the last number handed out, and until that
//! applies the key serves nothing (a call on it waits), so nothing above the
//! lowered ceiling is ever handed out.

use std::collections::HashMap;

use super::keymap::KeyMap;
use super::types::{Mode, NamespaceId, Namespaces, SeqKey, SeqRange};

/// Read access to the replicated state: the committed ceiling of a key.
pub trait CeilingSource {
    /// Highest number the applied state allows for `key`, 0 when the key has
    /// never been allocated.
    fn committed_ceiling(&self, key: &SeqKey) -> u64;
}

/// What this node may do, as far as allocation is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not the leader: every call is refused with a leader hint.
    Follower,
    /// Elected leader in `term`. `serving` turns on once the leader's own
    /// start-of-term entry has been applied, which means every entry of
    /// earlier terms has been applied too; it turns off again while handing
    /// over (trim).
    Leader { term: u64, serving: bool },
}

/// Outcome of an allocation attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// Numbers taken from committed room; one range per item, in order.
    Granted(Vec<SeqRange>),
    /// Some key lacks room; refills are queued (see
    /// [`Allocator::take_raises`]). Nothing was taken; try again after the
    /// next applied raise.
    Wait,
    /// Dense namespace: the ranges are reserved and their exact raises are
    /// queued. The caller MUST NOT return them before the entry carrying
    /// those raises has been applied.
    Reserved(Vec<SeqRange>),
}

/// Why an allocation cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("this node is not serving allocations")]
    NotServing,
    #[error("key {key:?} is exhausted: {wanted} more numbers would pass the ceiling {max}")]
    Exhausted { key: String, wanted: u32, max: u64 },
}

/// A ceiling raise the leader wants replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseRaise {
    pub key: SeqKey,
    pub ceiling: u64,
}

/// Where [`Allocator::allocate`] notes a key that is not in memory yet.
const NOT_IN_MEMORY: usize = usize::MAX;

#[derive(Debug, Clone)]
struct KeyState {
    /// Next number to hand out (segmented) or to reserve (dense).
    next: u64,
    /// Highest applied ceiling.
    ceiling: u64,
    /// Current refill step (segmented).
    step: u64,
    /// Highest number a waiting call needs; refills cover at least this.
    want: u64,
    /// Ceiling requested by the refill in flight, 0 when none.
    in_flight: u64,
    /// Whether the key sits in the refill queue.
    queued: bool,
    /// When the key was last refilled (caller's milliseconds), 0 = never.
    last_refill_ms: u64,
    /// When a call last asked for the key (caller's milliseconds, as of the
    /// last [`Allocator::take_raises`] or [`Allocator::take_releases`]).
    last_used_ms: u64,
    /// A release of the key is in the log: it MUST NOT hand out anything
    /// until the release applies (and the key leaves memory) or fails.
    releasing: bool,
}

/// A key that may leave the leader's memory once its ceiling is lowered to
/// `ceiling`, the last number handed out; `from` is the ceiling the leader
/// saw, which the state machine checks is still in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub key: SeqKey,
    pub ceiling: u64,
    pub from: u64,
}

/// The leader's in-memory allocation state.
#[derive(Debug)]
pub struct Allocator {
    namespaces: Namespaces,
    /// Walked by handle, so that the idle sweep can take a slice at a
    /// time; in shards, so that no insert moves every key (see
    /// [`KeyMap`]). Hashed with foldhash, not SipHash: every key of every
    /// call is hashed here, and on keys of a few dozen bytes foldhash is
    /// several times faster. Its seed is random per process and no answer
    /// shows the hash order (only a trim entry in the log lists keys shard
    /// by shard), so a caller cannot aim keys at one bucket without first
    /// learning the seed from timings (foldhash is only "minimally
    /// DoS-resistant"; seqd's callers are the backend's own frontends).
    keys: KeyMap<SeqKey, KeyState>,
    /// The caller's clock as of the last call that passed it.
    now_ms: u64,
    /// Where the idle sweep goes on (a [`KeyMap::next_from`] cursor).
    sweep_at: usize,
    role: Role,
    epoch: u64,
    /// Keys whose refill should go into the next proposal.
    refill_queue: Vec<SeqKey>,
    /// A queued refill should not wait for the next batch (see
    /// [`Allocator::refill_urgent`]).
    urgent: bool,
    /// Exact raises for dense reservations, for the next proposal.
    dense_raises: HashMap<SeqKey, u64>,
}

/// Whether a key may leave memory (see [`Allocator::take_releases`]).
enum Idleness {
    /// Used lately, or something of it on its way to the log.
    InUse,
    /// Idle, and its committed ceiling is where it stands: it can go.
    NoRoom,
    /// Idle with unused room, which a release must give back first.
    Room,
}

/// Whether `key` has been idle for `idle_ms` (else its namespace's
/// `forget_idle_ms`) as of `now_ms`, and what leaving memory takes.
fn idleness(
    key: &SeqKey,
    state: &KeyState,
    now_ms: u64,
    idle_ms: Option<u64>,
    namespaces: &Namespaces,
    dense_raises: &HashMap<SeqKey, u64>,
) -> Idleness {
    let idle_for = now_ms.saturating_sub(state.last_used_ms);
    let idle = match idle_ms {
        Some(ms) => idle_for >= ms,
        None => {
            let forget = namespaces.spec(key.namespace()).forget_idle_ms;
            forget != 0 && idle_for >= forget
        }
    };
    // Anything on its way to the log keeps the key: a refill or a dense
    // reservation in flight, a call waiting for room.
    let settled = !state.releasing
        && !state.queued
        && state.in_flight == 0
        && state.want == 0
        && !dense_raises.contains_key(key);
    if !idle || !settled {
        Idleness::InUse
    } else if state.next - 1 == state.ceiling {
        Idleness::NoRoom
    } else if state.next - 1 < state.ceiling {
        // Unused room: a segment's rest, or (dense) the room of a
        // reservation whose call failed when memory was reset.
        Idleness::Room
    } else {
        Idleness::InUse
    }
}

/// The release of `key`'s unused room. Marked (`state.releasing`), the
/// key serves nothing until its release settles.
fn release_of(key: &SeqKey, state: &KeyState) -> Release {
    Release {
        key: key.clone(),
        ceiling: state.next - 1,
        from: state.ceiling,
    }
}

impl Allocator {
    pub fn new(namespaces: Namespaces) -> Self {
        Self {
            namespaces,
            keys: KeyMap::default(),
            now_ms: 0,
            sweep_at: 0,
            role: Role::Follower,
            epoch: 0,
            refill_queue: Vec::new(),
            urgent: false,
            dense_raises: HashMap::new(),
        }
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn is_serving(&self) -> bool {
        matches!(self.role, Role::Leader { serving: true, .. })
    }

    /// Number of keys held in memory.
    pub fn active_keys(&self) -> usize {
        self.keys.len()
    }

    /// This node won the election for `term`. It does not serve until
    /// [`Allocator::start_serving`].
    pub fn become_leader(&mut self, term: u64) {
        self.forget_all();
        self.role = Role::Leader {
            term,
            serving: false,
        };
    }

    /// The leader's start-of-term entry has been applied with this epoch.
    pub fn start_serving(&mut self, epoch: u64) {
        if let Role::Leader { term, .. } = self.role {
            self.epoch = epoch;
            self.role = Role::Leader {
                term,
                serving: true,
            };
        }
    }

    /// Leadership is gone (or uncertain).
    pub fn step_down(&mut self) {
        self.forget_all();
        self.role = Role::Follower;
    }

    /// Drops every in-memory key: they reload above their committed ceiling.
    /// Safe when leadership changes (a new term serves only after every
    /// earlier entry applied) and after a trim; a leader that goes on
    /// serving with releases in the log MUST use
    /// [`Allocator::forget_settled`] instead. Callers MUST fail every call
    /// still waiting on a dense reservation, since those numbers are
    /// forgotten too.
    pub fn forget_all(&mut self) {
        self.keys.clear();
        self.sweep_at = 0;
        self.refill_queue.clear();
        self.urgent = false;
        self.dense_raises.clear();
    }

    /// Drops every in-memory key except those being released, for a leader
    /// that keeps serving but lost a proposal (see [`Allocator::forget_all`]
    /// for what callers MUST do). A releasing key keeps its memory: it
    /// serves nothing until its release settles, and forgetting it could let
    /// it reload at its old ceiling, serve from a later raise, and then be
    /// lowered under what it served by the release still in the log. Its
    /// memory stays true meanwhile: a raise for it that applies first moves
    /// its memory up with the stored ceiling (and makes the release fail),
    /// and only a trim lowers a ceiling (a trim MUST be followed by
    /// [`Allocator::forget_all`]).
    pub fn forget_settled(&mut self) {
        self.keys.retain(|_, state| state.releasing);
        self.refill_queue.clear();
        self.urgent = false;
        self.dense_raises.clear();
        self.sweep_at = 0;
    }

    /// Allocates `count` numbers for each item, all or nothing. Items MUST
    /// have distinct keys in the same namespace.
    pub fn allocate(
        &mut self,
        items: &[(SeqKey, u32)],
        source: &impl CeilingSource,
    ) -> Result<Allocation, AllocError> {
        // A key twice would have each item checked against the same room
        // and then reserved one after the other, past the ceiling (the
        // service refuses it; this catches a caller that does not).
        debug_assert!(
            {
                let mut seen = std::collections::HashSet::with_capacity(items.len());
                items.iter().all(|(k, _)| seen.insert(k))
            },
            "allocate: a key appears twice in one call"
        );
        if !self.is_serving() {
            return Err(AllocError::NotServing);
        }
        let Some((first_key, _)) = items.first() else {
            return Ok(Allocation::Granted(Vec::new()));
        };
        // Copied out (not the whole spec, whose name is a String): this is the
        // hot path, and `self` is borrowed mutably below.
        let (mode, max_value) = {
            let spec = self.namespaces.spec(first_key.namespace());
            (spec.mode, spec.max_value)
        };

        // Check every item before touching any, so a failure changes nothing.
        let now_ms = self.now_ms;
        let mut releasing = false;
        // Each key's handle in `keys`, found once: the passes below reach
        // its state without hashing or comparing it again (nothing is
        // removed from `keys` within this call). Every key is hashed, then
        // every key is looked up, then any missing one is loaded: a map
        // holding many keys is far larger than the caches, and lookups
        // that do not wait for one another's misses overlap them (a call
        // of 16 keys among a million: 3.3 times faster, `cargo bench
        // --bench core`). `at` holds each key's hash until the key is
        // looked up.
        let mut at: Vec<usize> = items
            .iter()
            .map(|(key, _)| self.keys.hash(key) as usize)
            .collect();
        for (index, (key, _)) in at.iter_mut().zip(items) {
            *index = self.keys.find(*index as u64, key).unwrap_or(NOT_IN_MEMORY);
        }
        for ((key, count), index) in items.iter().zip(at.iter_mut()) {
            let state;
            (*index, state) = self.load(key, *index, source);
            state.last_used_ms = now_ms;
            releasing |= state.releasing;
            if state.next > max_value || max_value - state.next + 1 < u64::from(*count) {
                return Err(AllocError::Exhausted {
                    key: key.key().to_string(),
                    wanted: *count,
                    max: max_value,
                });
            }
        }
        // A key being released serves nothing until the release has applied
        // (it then reloads at the lowered ceiling) or failed.
        if releasing {
            return Ok(Allocation::Wait);
        }

        if mode == Mode::Dense {
            let mut ranges = Vec::with_capacity(items.len());
            for ((key, count), &index) in items.iter().zip(&at) {
                let range = reserve(&mut self.keys[index], *count);
                self.dense_raises.insert(key.clone(), range.last());
                ranges.push(range);
            }
            return Ok(Allocation::Reserved(ranges));
        }

        let mut short = false;
        for ((key, count), &index) in items.iter().zip(&at) {
            let state = &mut self.keys[index];
            let need = state.next + u64::from(*count) - 1;
            if need > state.ceiling {
                short = true;
                self.urgent = true;
                state.want = state.want.max(need);
                if state.in_flight < need && !state.queued {
                    state.queued = true;
                    self.refill_queue.push(key.clone());
                }
            }
        }
        if short {
            return Ok(Allocation::Wait);
        }

        let mut ranges = Vec::with_capacity(items.len());
        for ((key, count), &index) in items.iter().zip(&at) {
            let state = &mut self.keys[index];
            ranges.push(reserve(state, *count));
            // Double buffering: ask for the next segment while this one still
            // has room, so steady-state calls never wait on the log.
            let room = state.ceiling + 1 - state.next;
            if room < state.step / 2 + 1
                && state.in_flight <= state.ceiling
                && state.ceiling < max_value
            {
                if !state.queued {
                    state.queued = true;
                    self.refill_queue.push(key.clone());
                }
                // Half of that room gone and the refill still queued: the
                // key uses its room faster than refills are batched.
                if room < state.step / 4 + 1 {
                    self.urgent = true;
                }
            }
        }
        Ok(Allocation::Granted(ranges))
    }

    /// Whether a queued refill should go to the log now rather than with
    /// the next batch of refills: a call waits for it, or its key has used
    /// half of the room it had left when the refill was queued (a key
    /// that runs through its segment faster than refills are batched).
    /// Refills are queued with half a segment to go, and a segment lasts
    /// about `refill_interval_ms` once the step has adapted, so the others
    /// can wait for company.
    pub fn refill_urgent(&self) -> bool {
        self.urgent
    }

    /// Takes the raises to replicate in one log entry: queued refills
    /// (segmented) and exact reservations (dense). Adapts each refilled key's
    /// step to how often it refills.
    pub fn take_raises(&mut self, now_ms: u64) -> Vec<DenseRaise> {
        self.now_ms = self.now_ms.max(now_ms);
        self.urgent = false;
        let mut raises: Vec<DenseRaise> = self
            .dense_raises
            .drain()
            .map(|(key, ceiling)| DenseRaise { key, ceiling })
            .collect();
        for key in std::mem::take(&mut self.refill_queue) {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            state.queued = false;
            let spec = self.namespaces.spec(key.namespace());
            if state.last_refill_ms != 0 {
                let since = now_ms.saturating_sub(state.last_refill_ms);
                if since < spec.refill_interval_ms {
                    state.step = state.step.saturating_mul(2).min(spec.step_max);
                } else if since > spec.refill_interval_ms.saturating_mul(4) {
                    state.step = (state.step / 2).max(spec.step_min);
                }
            }
            state.last_refill_ms = now_ms.max(1);
            let base = state.ceiling.max(state.want).max(state.in_flight);
            let target = base.saturating_add(state.step).min(spec.max_value);
            if target <= state.ceiling.max(state.in_flight) {
                continue;
            }
            state.in_flight = target;
            raises.push(DenseRaise {
                key,
                ceiling: target,
            });
        }
        raises
    }

    /// A raise for `key` up to `ceiling` has been applied.
    pub fn on_ceiling_applied(&mut self, key: &SeqKey, ceiling: u64) {
        if let Some(state) = self.keys.get_mut(key) {
            state.ceiling = state.ceiling.max(ceiling);
            if state.in_flight <= state.ceiling {
                state.in_flight = 0;
            }
            if state.want <= state.ceiling {
                state.want = 0;
            }
        }
    }

    /// Looks at up to `budget` keys (a slice of the map, round robin, so a
    /// sweep costs the same however many keys are held) and returns those
    /// idle past their namespace's `forget_idle_ms` whose unused room must
    /// be released through the log before they leave memory. Idle keys with
    /// no unused room leave memory at once: their committed ceiling is
    /// already where they stand. A returned key serves nothing until
    /// [`Allocator::on_released`] or [`Allocator::end_release`].
    pub fn take_releases(&mut self, now_ms: u64, budget: usize) -> Vec<Release> {
        self.sweep_releases(now_ms, budget, None, true)
    }

    /// The keys among the next `budget` the sweep looks at (as
    /// [`Allocator::take_releases`] does) that have been idle for `idle_ms`,
    /// whatever their namespace's `forget_idle_ms`, and hold unused room;
    /// idle keys without room leave memory at once. Not yet marked: a
    /// leader about to hand over collects many, sorts them by name, then
    /// releases them a few at a time with [`Allocator::take_releases_of`],
    /// so that each release entry's keys lie close together in the state
    /// family (a release reads and writes each key's stored ceiling, and
    /// neighbours share the memtable's and the tables' search paths).
    pub fn idle_keys_for(&mut self, now_ms: u64, budget: usize, idle_ms: u64) -> Vec<SeqKey> {
        self.sweep_releases(now_ms, budget, Some(idle_ms), false)
            .into_iter()
            .map(|r| r.key)
            .collect()
    }

    /// Of `keys`, the releases of those still held, idle for `idle_ms`,
    /// settled and with unused room, marked as [`Allocator::take_releases`]
    /// marks its own; those idle without room leave memory at once. A key
    /// used since it was listed is left alone.
    pub fn take_releases_of(&mut self, now_ms: u64, keys: &[SeqKey], idle_ms: u64) -> Vec<Release> {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.is_serving() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for key in keys {
            let Some(state) = self.keys.get_mut(key) else {
                continue;
            };
            match idleness(
                key,
                state,
                self.now_ms,
                Some(idle_ms),
                &self.namespaces,
                &self.dense_raises,
            ) {
                Idleness::InUse => {}
                Idleness::NoRoom => {
                    self.keys.swap_remove(key);
                }
                Idleness::Room => {
                    state.releasing = true;
                    out.push(release_of(key, state));
                }
            }
        }
        out
    }

    fn sweep_releases(
        &mut self,
        now_ms: u64,
        budget: usize,
        idle_ms: Option<u64>,
        mark: bool,
    ) -> Vec<Release> {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.is_serving() || self.keys.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for _ in 0..budget.min(self.keys.len()) {
            let Some(i) = self.keys.next_from(&mut self.sweep_at) else {
                break;
            };
            let Some((key, state)) = self.keys.get_at_mut(i) else {
                break;
            };
            match idleness(
                key,
                state,
                self.now_ms,
                idle_ms,
                &self.namespaces,
                &self.dense_raises,
            ) {
                Idleness::InUse => {}
                Idleness::NoRoom => gone.push(i),
                Idleness::Room => {
                    state.releasing |= mark;
                    out.push(release_of(key, state));
                }
            }
        }
        // From the highest handle down (the walk may have wrapped), so that
        // each swap_remove moves an entry that is not itself to be removed.
        gone.sort_unstable_by(|x, y| y.cmp(x));
        for i in gone {
            self.keys.swap_remove_at(i);
        }
        out
    }

    /// A release of `key` down to `ceiling` has been applied: the key leaves
    /// memory and reloads from the lowered ceiling when next asked for.
    ///
    /// A key in memory that is not releasing was forgotten and loaded again
    /// while the release was in the log (at the ceiling the release lowers
    /// from, so above it, with nothing handed out until a raise proposed
    /// after the release applies): it stays.
    pub fn on_released(&mut self, key: &SeqKey, ceiling: u64) {
        if let Some(state) = self.keys.get(key) {
            if state.releasing {
                // It handed out nothing since the release was taken.
                debug_assert_eq!(state.next - 1, ceiling);
                self.keys.swap_remove(key);
            }
        }
    }

    /// The releases of `keys` are settled (applied, refused by the state
    /// machine, or lost): those still in memory serve again.
    pub fn end_release(&mut self, keys: &[SeqKey]) {
        for key in keys {
            if let Some(state) = self.keys.get_mut(key) {
                state.releasing = false;
            }
        }
    }

    /// The highest number that may have been handed out for `key`.
    pub fn current(&self, key: &SeqKey, source: &impl CeilingSource) -> Result<u64, AllocError> {
        if !self.is_serving() {
            return Err(AllocError::NotServing);
        }
        Ok(match self.keys.get(key) {
            // Dense reservations count only once their raise has applied.
            Some(state) => (state.next - 1).min(state.ceiling),
            None => source.committed_ceiling(key),
        })
    }

    /// Stops serving and returns, for every key with unused room, the last
    /// number handed out: committing these as ceilings lets the next leader
    /// continue without a hole. In memory order, not sorted: at ten
    /// million keys a sort would hold the node loop for seconds.
    pub fn begin_trim(&mut self) -> Vec<DenseRaise> {
        if let Role::Leader { term, .. } = self.role {
            self.role = Role::Leader {
                term,
                serving: false,
            };
        }
        self.keys
            .iter()
            .filter(|(k, s)| {
                // A raise still in flight will commit before the trim and
                // leave room too: trim whenever either ceiling is above use.
                self.namespaces.spec(k.namespace()).mode == Mode::Segmented
                    && s.next - 1 < s.ceiling.max(s.in_flight)
            })
            .map(|(k, s)| DenseRaise {
                key: k.clone(),
                ceiling: s.next - 1,
            })
            .collect()
    }

    /// The state of `key`, found at `index` in `keys` (not copied), or
    /// loaded at its committed ceiling if `index` is [`NOT_IN_MEMORY`]; and
    /// its index.
    fn load(
        &mut self,
        key: &SeqKey,
        index: usize,
        source: &impl CeilingSource,
    ) -> (usize, &mut KeyState) {
        let index = match index {
            NOT_IN_MEMORY => {
                let ceiling = source.committed_ceiling(key);
                let state = KeyState {
                    next: ceiling + 1,
                    ceiling,
                    step: self.namespaces.spec(key.namespace()).step_min,
                    want: 0,
                    in_flight: 0,
                    queued: false,
                    last_refill_ms: 0,
                    last_used_ms: 0,
                    releasing: false,
                };
                self.keys.insert_new(key.clone(), state)
            }
            index => index,
        };
        (index, &mut self.keys[index])
    }

    /// Namespace of a key, for callers that map keys back to names.
    pub fn namespace_name(&self, ns: NamespaceId) -> &str {
        &self.namespaces.spec(ns).name
    }
}

fn reserve(state: &mut KeyState, count: u32) -> SeqRange {
    let Some(range) = SeqRange::try_new(state.next, count) else {
        unreachable!("exhaustion is checked before reserving");
    };
    state.next += u64::from(count);
    range
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::{test_spec, NamespaceSpec};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The replicated state, reduced to a map of applied ceilings.
    #[derive(Default)]
    struct Applied(BTreeMap<SeqKey, u64>);

    impl CeilingSource for Applied {
        fn committed_ceiling(&self, key: &SeqKey) -> u64 {
            self.0.get(key).copied().unwrap_or(0)
        }
    }

    impl Applied {
        fn apply(&mut self, alloc: &mut Allocator, raises: &[DenseRaise]) {
            for r in raises {
                let c = self.0.entry(r.key.clone()).or_insert(0);
                *c = (*c).max(r.ceiling);
                alloc.on_ceiling_applied(&r.key, *c);
            }
        }
    }

    fn setup(spec: NamespaceSpec) -> (Allocator, SeqKey) {
        let name = spec.name.clone();
        let ns = Namespaces::new(vec![spec]);
        let id = ns.resolve(&name).unwrap();
        let key = SeqKey::try_new(&ns, id, "k").unwrap();
        let mut a = Allocator::new(ns);
        a.become_leader(1);
        a.start_serving(1);
        (a, key)
    }

    #[test]
    fn first_call_waits_for_a_refill_then_is_served_from_memory() {
        let (mut a, key) = setup(test_spec("conv"));
        let mut db = Applied::default();
        assert_eq!(
            a.allocate(&[(key.clone(), 1)], &db).unwrap(),
            Allocation::Wait
        );
        let raises = a.take_raises(10);
        assert_eq!(raises.len(), 1);
        // The waiting call's number plus a full step of headroom.
        assert_eq!(raises[0].ceiling, 101);
        db.apply(&mut a, &raises);
        match a.allocate(&[(key.clone(), 3)], &db).unwrap() {
            Allocation::Granted(r) => assert_eq!((r[0].first(), r[0].count()), (1, 3)),
            other => panic!("{other:?}"),
        }
        assert_eq!(a.current(&key, &db).unwrap(), 3);
    }

    #[test]
    fn refill_is_requested_before_the_segment_runs_out() {
        let (mut a, key) = setup(test_spec("conv"));
        let mut db = Applied::default();
        a.allocate(&[(key.clone(), 1)], &db).unwrap();
        let r = a.take_raises(0);
        db.apply(&mut a, &r);
        // 101 numbers of room: the refill is asked for once under half a
        // step is left, long before the segment runs out.
        let mut refill = None;
        for n in 1..=101u64 {
            let Allocation::Granted(r) = a.allocate(&[(key.clone(), 1)], &db).unwrap() else {
                panic!("served from memory")
            };
            assert_eq!(r[0].first(), n);
            let raises = a.take_raises(5);
            if !raises.is_empty() {
                refill = Some((n, raises));
                break;
            }
        }
        let (at, r) = refill.expect("a refill before the segment runs out");
        assert_eq!(at, 51, "refill when 50 of 101 remain");
        // Refilled within the target interval: the step doubles.
        assert_eq!(r[0].ceiling, 301);
    }

    /// A refill asked for ahead of need may wait for the next batch; one a
    /// call waits for, or one whose key has used half of its remaining
    /// room meanwhile, may not.
    #[test]
    fn refills_are_urgent_when_a_call_waits_or_the_room_runs_low() {
        let (mut a, key) = setup(test_spec("conv"));
        let mut db = Applied::default();
        assert!(!a.refill_urgent());
        assert_eq!(
            a.allocate(&[(key.clone(), 1)], &db).unwrap(),
            Allocation::Wait
        );
        assert!(a.refill_urgent(), "a call waits");
        let r = a.take_raises(0);
        assert!(!a.refill_urgent(), "taken");
        db.apply(&mut a, &r);
        // Room 101 (step 100): queued once under 51 remain, urgent once
        // under 26 remain with the refill still queued.
        let serve = |a: &mut Allocator, count| {
            let got = a.allocate(&[(key.clone(), count)], &db).unwrap();
            assert!(matches!(got, Allocation::Granted(_)), "{got:?}");
        };
        serve(&mut a, 51);
        assert!(!a.refill_urgent(), "50 remain: queued, not urgent");
        serve(&mut a, 24);
        assert!(!a.refill_urgent(), "26 remain");
        serve(&mut a, 1);
        assert!(a.refill_urgent(), "25 remain and the refill not yet taken");
        let r = a.take_raises(1);
        assert_eq!(r.len(), 1);
        // In flight now: using more room does not make it urgent again.
        serve(&mut a, 20);
        assert!(!a.refill_urgent());
    }

    #[test]
    fn exhaustion_fails_without_wrapping_or_partial_effects() {
        let mut spec = test_spec("conv");
        spec.max_value = 10;
        let (mut a, key) = setup(spec);
        let mut db = Applied::default();
        a.allocate(&[(key.clone(), 1)], &db).unwrap();
        let r = a.take_raises(0);
        assert_eq!(
            r[0].ceiling, 10,
            "refills are capped at the namespace ceiling"
        );
        db.apply(&mut a, &r);
        assert!(matches!(
            a.allocate(&[(key.clone(), 8)], &db).unwrap(),
            Allocation::Granted(_)
        ));
        let err = a.allocate(&[(key.clone(), 3)], &db).unwrap_err();
        assert!(matches!(err, AllocError::Exhausted { .. }));
        assert_eq!(a.current(&key, &db).unwrap(), 8);
        match a.allocate(&[(key.clone(), 2)], &db).unwrap() {
            Allocation::Granted(r) => assert_eq!(r[0].last(), 10),
            other => panic!("{other:?}"),
        }
        assert!(a.allocate(&[(key.clone(), 1)], &db).is_err());
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut spec = test_spec("conv");
        spec.max_value = 5;
        let ns = Namespaces::new(vec![spec]);
        let id = ns.resolve("conv").unwrap();
        let k1 = SeqKey::try_new(&ns, id, "a").unwrap();
        let k2 = SeqKey::try_new(&ns, id, "b").unwrap();
        let mut a = Allocator::new(ns);
        a.become_leader(1);
        a.start_serving(0);
        let mut db = Applied::default();
        db.0.insert(k2.clone(), 5);
        let err = a
            .allocate(&[(k1.clone(), 1), (k2.clone(), 1)], &db)
            .unwrap_err();
        assert!(matches!(err, AllocError::Exhausted { ref key, .. } if key == "b"));
        assert!(a.take_raises(0).is_empty(), "a failed batch queues nothing");
        assert_eq!(a.current(&k1, &db).unwrap(), 0);
    }

    #[test]
    fn a_batch_of_keys_in_memory_and_keys_not_yet_loaded_continues_each_key() {
        let (mut a, key) = setup(test_spec("conv"));
        let ns = a.namespaces.clone();
        let id = key.namespace();
        let k = |i: usize| SeqKey::try_new(&ns, id, format!("k{i}")).unwrap();
        let mut db = Applied::default();
        // k0, k2 and k4 in memory, having handed out 5, 2 and 9 numbers.
        for (i, used) in [(0, 5), (2, 2), (4, 9)] {
            serve(&mut a, &mut db, &k(i), used, 10);
        }
        // k5 is not in memory but has a committed ceiling: it resumes above.
        db.0.insert(k(5), 40);
        // Keys found in memory interleaved with keys loaded for this call:
        // each range must be its own key's.
        let items: Vec<(SeqKey, u32)> = [(1, 3), (0, 1), (3, 2), (4, 4), (2, 1), (5, 2)]
            .into_iter()
            .map(|(i, count)| (k(i), count))
            .collect();
        let ranges = loop {
            match a.allocate(&items, &db).unwrap() {
                Allocation::Granted(ranges) => break ranges,
                Allocation::Wait => {
                    let raises = a.take_raises(20);
                    assert!(!raises.is_empty(), "a waiting call queues refills");
                    db.apply(&mut a, &raises);
                }
                other => panic!("{other:?}"),
            }
        };
        let got: Vec<(u64, u32)> = ranges.iter().map(|r| (r.first(), r.count())).collect();
        assert_eq!(got, [(1, 3), (6, 1), (1, 2), (10, 4), (3, 1), (41, 2)]);
    }

    #[test]
    fn dense_reserves_exactly_what_was_asked() {
        let mut spec = test_spec("inbox");
        spec.mode = Mode::Dense;
        let (mut a, key) = setup(spec);
        let mut db = Applied::default();
        let Allocation::Reserved(r1) = a.allocate(&[(key.clone(), 2)], &db).unwrap() else {
            panic!()
        };
        let Allocation::Reserved(r2) = a.allocate(&[(key.clone(), 3)], &db).unwrap() else {
            panic!()
        };
        assert_eq!((r1[0].first(), r2[0].first(), r2[0].last()), (1, 3, 5));
        let raises = a.take_raises(0);
        assert_eq!(
            raises,
            vec![DenseRaise {
                key: key.clone(),
                ceiling: 5
            }]
        );
        db.apply(&mut a, &raises);
        assert_eq!(a.current(&key, &db).unwrap(), 5);
    }

    #[test]
    fn trim_hands_over_exactly_what_was_used() {
        let (mut a, key) = setup(test_spec("conv"));
        let mut db = Applied::default();
        a.allocate(&[(key.clone(), 1)], &db).unwrap();
        let r = a.take_raises(0);
        db.apply(&mut a, &r);
        a.allocate(&[(key.clone(), 7)], &db).unwrap();
        let trim = a.begin_trim();
        assert_eq!(
            trim,
            vec![DenseRaise {
                key: key.clone(),
                ceiling: 7
            }]
        );
        assert_eq!(
            a.allocate(&[(key.clone(), 1)], &db),
            Err(AllocError::NotServing)
        );
    }

    #[test]
    fn trim_covers_room_from_a_raise_still_in_flight() {
        let (mut a, key) = setup(test_spec("conv"));
        let mut db = Applied::default();
        a.allocate(&[(key.clone(), 1)], &db).unwrap();
        let r = a.take_raises(0);
        db.apply(&mut a, &r);
        // Use the whole segment, so a refill is in flight at hand-over.
        while let Ok(Allocation::Granted(_)) = a.allocate(&[(key.clone(), 1)], &db) {}
        assert!(!a.take_raises(0).is_empty());
        let used = a.current(&key, &db).unwrap();
        let trim = a.begin_trim();
        assert_eq!(
            trim,
            vec![DenseRaise {
                key: key.clone(),
                ceiling: used
            }]
        );
    }

    fn idle_spec(mode: Mode) -> NamespaceSpec {
        let mut spec = test_spec("conv");
        spec.mode = mode;
        spec.forget_idle_ms = 1_000;
        spec
    }

    /// Serves `count` numbers for `key` at `now`, refilling as needed.
    fn serve(a: &mut Allocator, db: &mut Applied, key: &SeqKey, count: u32, now: u64) -> SeqRange {
        a.take_raises(now);
        for _ in 0..3 {
            match a.allocate(&[(key.clone(), count)], db).unwrap() {
                Allocation::Granted(r) => return r[0],
                Allocation::Reserved(r) => {
                    let raises = a.take_raises(now);
                    db.apply(a, &raises);
                    return r[0];
                }
                Allocation::Wait => {
                    let raises = a.take_raises(now);
                    db.apply(a, &raises);
                }
            }
        }
        panic!("no number after two refills");
    }

    #[test]
    fn an_idle_key_leaves_memory_through_a_release_and_resumes_without_a_hole() {
        let (mut a, key) = setup(idle_spec(Mode::Segmented));
        let mut db = Applied::default();
        assert_eq!(serve(&mut a, &mut db, &key, 5, 100).first(), 1);
        assert!(a.take_releases(900, 10).is_empty(), "not idle yet");

        let releases = a.take_releases(1_100, 10);
        assert_eq!(
            releases,
            vec![Release {
                key: key.clone(),
                ceiling: 5,
                from: db.committed_ceiling(&key),
            }]
        );
        // While the release is in the log the key serves nothing and asks
        // for no refill (a raise after the release would be lowered by it).
        assert_eq!(
            a.allocate(&[(key.clone(), 1)], &db).unwrap(),
            Allocation::Wait
        );
        assert!(a.take_raises(1_100).is_empty());
        assert!(a.take_releases(5_000, 10).is_empty(), "released once");

        db.0.insert(key.clone(), 5);
        a.on_released(&key, 5);
        a.end_release(std::slice::from_ref(&key));
        assert_eq!(a.active_keys(), 0);
        assert_eq!(a.current(&key, &db).unwrap(), 5);
        assert_eq!(serve(&mut a, &mut db, &key, 1, 1_200).first(), 6, "no hole");
    }

    #[test]
    fn a_reset_while_serving_keeps_a_releasing_key_until_its_release_settles() {
        let (mut a, key) = setup(idle_spec(Mode::Segmented));
        let other = SeqKey::try_new(a.namespaces(), key.namespace(), "other").unwrap();
        let mut db = Applied::default();
        serve(&mut a, &mut db, &key, 5, 100);
        serve(&mut a, &mut db, &other, 1, 1_000);
        let releases = a.take_releases(1_500, 10);
        assert_eq!(releases.len(), 1);

        // A dropped proposal resets the memory of every other key. Were the
        // releasing key forgotten too, it could reload at its old ceiling
        // and serve from a later raise while the release (which lowers the
        // ceiling under those numbers) is still in the log.
        a.forget_settled();
        assert_eq!(a.active_keys(), 1);
        assert_eq!(
            a.allocate(&[(key.clone(), 1)], &db).unwrap(),
            Allocation::Wait
        );

        db.0.insert(key.clone(), 5);
        a.on_released(&key, 5);
        a.end_release(std::slice::from_ref(&key));
        assert_eq!(serve(&mut a, &mut db, &key, 1, 1_600).first(), 6);
    }

    #[test]
    fn a_release_that_does_not_apply_lets_the_key_serve_on() {
        let (mut a, key) = setup(idle_spec(Mode::Segmented));
        let mut db = Applied::default();
        serve(&mut a, &mut db, &key, 5, 100);
        assert_eq!(a.take_releases(2_000, 10).len(), 1);
        a.end_release(std::slice::from_ref(&key));
        assert_eq!(serve(&mut a, &mut db, &key, 1, 2_000).first(), 6);
        assert_eq!(a.active_keys(), 1);
    }

    /// A handover lists idle keys first and releases them later, a few at a
    /// time: listing marks nothing, and a key used in between, or gone from
    /// memory, is left alone.
    #[test]
    fn idle_keys_are_listed_unmarked_and_taken_only_if_still_idle() {
        let (mut a, k0) = setup(idle_spec(Mode::Segmented));
        let ns = a.namespaces().clone();
        let k = |i: usize| SeqKey::try_new(&ns, k0.namespace(), format!("k{i}")).unwrap();
        let mut db = Applied::default();
        for i in 0..4 {
            serve(&mut a, &mut db, &k(i), 5, 100);
        }
        assert!(a.idle_keys_for(900, 10, 1_000).is_empty(), "not idle yet");
        let mut listed = a.idle_keys_for(1_100, 10, 1_000);
        listed.sort();
        assert_eq!(listed, (0..4).map(k).collect::<Vec<_>>());
        // Not marked: the keys still serve.
        assert_eq!(serve(&mut a, &mut db, &k(1), 1, 1_100).first(), 6);

        // k2 released on its own and gone from memory meanwhile.
        let alone = a.take_releases_of(1_200, &[k(2)], 1_000);
        assert_eq!(alone.len(), 1);
        db.0.insert(k(2), 5);
        a.on_released(&k(2), 5);
        assert_eq!(a.active_keys(), 3);

        // k1 was used after the listing (idle for 900 ms only).
        let releases = a.take_releases_of(2_000, &listed, 1_000);
        let released: Vec<SeqKey> = releases.iter().map(|r| r.key.clone()).collect();
        assert_eq!(released, vec![k(0), k(3)]);
        assert!(releases.iter().all(|r| r.ceiling == 5));
        // Marked: they serve nothing until settled, and are not taken or
        // listed twice.
        assert_eq!(a.allocate(&[(k(0), 1)], &db).unwrap(), Allocation::Wait);
        assert!(a.take_releases_of(2_000, &listed, 1_000).is_empty());
        assert_eq!(a.idle_keys_for(9_000, 10, 1_000), vec![k(1)]);
    }

    #[test]
    fn busy_keys_stay_and_keys_without_room_leave_at_once() {
        let (mut a, key) = setup(idle_spec(Mode::Segmented));
        let mut db = Applied::default();
        serve(&mut a, &mut db, &key, 5, 100);
        // Used again at 1,500: idle for 1,000 ms only at 2,500.
        serve(&mut a, &mut db, &key, 1, 1_500);
        assert!(a.take_releases(2_400, 10).is_empty());

        // A refill in flight keeps the key too.
        let used = db.committed_ceiling(&key);
        let left = u32::try_from(used - 6).unwrap();
        serve(&mut a, &mut db, &key, left, 2_400);
        assert!(!a.take_raises(2_400).is_empty(), "refill asked for");
        assert!(a.take_releases(9_000, 10).is_empty());

        // Dense keys stand at their ceiling once their raise applied: they
        // leave without a log entry and reload where they stood.
        let (mut d, dkey) = setup(idle_spec(Mode::Dense));
        let mut ddb = Applied::default();
        assert_eq!(serve(&mut d, &mut ddb, &dkey, 3, 100).last(), 3);
        assert!(d.take_releases(2_000, 10).is_empty());
        assert_eq!(d.active_keys(), 0);
        assert_eq!(serve(&mut d, &mut ddb, &dkey, 1, 2_100).first(), 4);
    }

    #[test]
    fn the_sweep_visits_a_slice_of_the_keys_per_call() {
        let spec = idle_spec(Mode::Segmented);
        let ns = Namespaces::new(vec![spec]);
        let id = ns.resolve("conv").unwrap();
        let mut a = Allocator::new(ns.clone());
        a.become_leader(1);
        a.start_serving(1);
        let mut db = Applied::default();
        for i in 0..5 {
            let key = SeqKey::try_new(&ns, id, format!("k{i}")).unwrap();
            serve(&mut a, &mut db, &key, 1, 100);
        }
        let mut released = 0;
        for _ in 0..3 {
            let r = a.take_releases(5_000, 2);
            assert!(r.len() <= 2);
            released += r.len();
        }
        assert_eq!(released, 5, "three slices of two cover five keys");
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// One call: distinct keys, each with its count.
        Alloc(Vec<(u8, u32)>),
        Propose,
        ApplySome(usize),
        LoseProposals,
        ChangeLeader,
        AdvanceTime(u64),
        Release(usize),
        DropProposal,
    }

    /// A log entry of the property test.
    #[derive(Debug, Clone)]
    enum Entry {
        Raise(Vec<DenseRaise>),
        Release(Vec<Release>),
    }

    impl Applied {
        /// Applies an entry the way the state machine and the node do.
        fn apply_entry(&mut self, a: &mut Allocator, e: &Entry) {
            match e {
                Entry::Raise(raises) => self.apply(a, raises),
                Entry::Release(releases) => {
                    for r in releases {
                        let current = self.committed_ceiling(&r.key);
                        if current == r.from && r.ceiling < current {
                            self.0.insert(r.key.clone(), r.ceiling);
                            a.on_released(&r.key, r.ceiling);
                        }
                    }
                    let keys: Vec<SeqKey> = releases.iter().map(|r| r.key.clone()).collect();
                    a.end_release(&keys);
                }
            }
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => proptest::collection::btree_map(0u8..4, 1u32..300, 1..=3)
                .prop_map(|items| items.into_iter().collect::<Vec<_>>())
                .prop_shuffle()
                .prop_map(Op::Alloc),
            2 => Just(Op::Propose),
            2 => (0usize..4).prop_map(Op::ApplySome),
            1 => Just(Op::LoseProposals),
            1 => Just(Op::ChangeLeader),
            1 => (0u64..5_000).prop_map(Op::AdvanceTime),
            2 => (1usize..4).prop_map(Op::Release),
            1 => Just(Op::DropProposal),
        ]
    }

    fn hand_out(
        key: &SeqKey,
        r: SeqRange,
        db: &Applied,
        last: &mut BTreeMap<SeqKey, u64>,
    ) -> Result<(), TestCaseError> {
        let prev = last.get(key).copied().unwrap_or(0);
        prop_assert!(
            r.first() > prev,
            "key {} went from {} to {}",
            key,
            prev,
            r.first()
        );
        prop_assert!(
            r.last() <= db.committed_ceiling(key),
            "above applied ceiling"
        );
        last.insert(key.clone(), r.last());
        Ok(())
    }

    proptest! {
        /// Whatever the interleaving of calls, refills, idle releases,
        /// dropped and lost proposals and leader changes: no number is handed out twice, numbers per key
        /// only grow, and nothing is handed out above an applied ceiling.
        #[test]
        fn never_duplicates_or_goes_backwards(ops in proptest::collection::vec(op(), 1..300), dense in any::<bool>()) {
            let mut spec = test_spec("conv");
            spec.max_value = 20_000;
            spec.forget_idle_ms = 1_000;
            if dense { spec.mode = Mode::Dense; }
            let ns = Namespaces::new(vec![spec]);
            let id = ns.resolve("conv").unwrap();
            let keys: Vec<SeqKey> = (0..4).map(|i| SeqKey::try_new(&ns, id, format!("k{i}")).unwrap()).collect();
            let mut a = Allocator::new(ns);
            let mut db = Applied::default();
            let mut term = 1;
            a.become_leader(term);
            a.start_serving(term);
            let mut log: Vec<Entry> = Vec::new();
            // Dense reservations become visible only when their entry applies.
            let mut pending_dense: Vec<(usize, SeqKey, SeqRange)> = Vec::new();
            let mut applied_entries = 0usize;
            let mut last: BTreeMap<SeqKey, u64> = BTreeMap::new();
            let mut now = 1u64;
            let mut reserved_since_propose: Vec<(SeqKey, SeqRange)> = Vec::new();


            for op in ops {
                match op {
                    Op::Alloc(items) => {
                        let items: Vec<(SeqKey, u32)> = items
                            .into_iter()
                            .map(|(key, count)| (keys[key as usize].clone(), count))
                            .collect();
                        match a.allocate(&items, &db) {
                            Ok(Allocation::Granted(ranges)) => {
                                prop_assert_eq!(ranges.len(), items.len());
                                for ((k, count), r) in items.iter().zip(ranges) {
                                    prop_assert_eq!(r.count(), *count);
                                    hand_out(k, r, &db, &mut last)?;
                                }
                            }
                            Ok(Allocation::Reserved(ranges)) => {
                                prop_assert_eq!(ranges.len(), items.len());
                                for ((k, count), r) in items.into_iter().zip(ranges) {
                                    prop_assert_eq!(r.count(), count);
                                    reserved_since_propose.push((k, r));
                                }
                            }
                            Ok(Allocation::Wait) | Err(_) => {}
                        }
                    }
                    Op::Propose => {
                        let raises = a.take_raises(now);
                        log.push(Entry::Raise(raises));
                        for (k, r) in reserved_since_propose.drain(..) {
                            pending_dense.push((log.len() - 1, k, r));
                        }
                    }
                    Op::ApplySome(n) => {
                        for _ in 0..n {
                            if applied_entries == log.len() { break; }
                            let entry = log[applied_entries].clone();
                            db.apply_entry(&mut a, &entry);
                            let done: Vec<_> = pending_dense.iter().filter(|(i, _, _)| *i == applied_entries).cloned().collect();
                            pending_dense.retain(|(i, _, _)| *i != applied_entries);
                            for (_, k, r) in done { hand_out(&k, r, &db, &mut last)?; }
                            applied_entries += 1;
                        }
                    }
                    Op::LoseProposals => {
                        // Unapplied entries of a deposed leader may vanish.
                        log.truncate(applied_entries);
                        term += 1;
                        a.become_leader(term);
                        a.start_serving(term);
                        pending_dense.clear();
                        reserved_since_propose.clear();
                    }
                    Op::ChangeLeader => {
                        // Entries survive; the new leader applies them all first.
                        while applied_entries < log.len() {
                            let entry = log[applied_entries].clone();
                            db.apply_entry(&mut a, &entry);
                            applied_entries += 1;
                        }
                        term += 1;
                        a.step_down();
                        a.become_leader(term);
                        a.start_serving(term);
                        pending_dense.clear();
                        reserved_since_propose.clear();
                    }
                    Op::AdvanceTime(ms) => now += ms,
                    Op::DropProposal => {
                        // raft-rs refuses a proposal: the leader serves on
                        // with its memory reset and fails every call holding
                        // a dense reservation, as the node does.
                        a.take_raises(now);
                        a.forget_settled();
                        pending_dense.clear();
                        reserved_since_propose.clear();
                    }
                    Op::Release(budget) => {
                        let releases = a.take_releases(now, budget);
                        if !releases.is_empty() {
                            log.push(Entry::Release(releases));
                        }
                    }
                }
            }
        }
    }
}
