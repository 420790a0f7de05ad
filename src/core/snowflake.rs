//! Snowflake IDs: layout, and the per-node issuer with its time fence.
//!
//! An ID is `0 | time | worker | sequence`. Uniqueness (I5) rests on:
//! - worker ids assigned through the Raft log, one holder at a time;
//! - a *fence* per worker, committed through the log: the holder stamps no
//!   timestamp above it, and whoever holds the worker next (another node, or
//!   the same node after a restart) stamps nothing at or below it;
//! - a clock that steps back while running is ridden on a logical clock for
//!   small steps and refused for large ones, so timestamps never go back.

/// Bits and epoch of an ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    epoch_ms: u64,
    time_bits: u32,
    worker_bits: u32,
    seq_bits: u32,
}

/// Milliseconds in an average Gregorian year.
const MS_PER_YEAR: f64 = 365.2425 * 86_400_000.0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("time_bits + worker_bits + sequence_bits must be 63 (one sign bit stays 0), not {0}")]
    BitsDontAddUp(u64),
    #[error("worker_bits must be between 1 and 20, not {0}")]
    WorkerBits(u32),
    #[error("sequence_bits must be between 1 and 22, not {0}")]
    SequenceBits(u32),
    #[error("time_bits must be at least 30, not {0}")]
    TimeBits(u32),
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch_ms {}, time/worker/sequence bits {}/{}/{}",
            self.epoch_ms, self.time_bits, self.worker_bits, self.seq_bits
        )
    }
}

impl Layout {
    /// The layout [`Layout::to_parts`] gave, if those parts make one.
    pub fn from_parts(parts: &[u64]) -> Option<Self> {
        let bits = |i: usize| parts.get(i).and_then(|&b| u32::try_from(b).ok());
        Self::try_new(*parts.first()?, bits(1)?, bits(2)?, bits(3)?).ok()
    }

    /// Epoch and bit widths as a peer stream names them:
    /// `epoch_ms.time.worker.sequence`.
    pub fn to_header(&self) -> String {
        self.to_parts().map(|p| p.to_string()).join(".")
    }

    /// The layout [`Layout::to_header`] gave, if the text is one.
    pub fn from_header(text: &str) -> Option<Self> {
        let parts: Vec<u64> = text
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        if parts.len() != 4 {
            return None;
        }
        Self::from_parts(&parts)
    }

    /// Epoch and bit widths, as stored beside the data they stamped.
    pub fn to_parts(&self) -> [u64; 4] {
        [
            self.epoch_ms,
            u64::from(self.time_bits),
            u64::from(self.worker_bits),
            u64::from(self.seq_bits),
        ]
    }

    pub fn try_new(
        epoch_ms: u64,
        time_bits: u32,
        worker_bits: u32,
        seq_bits: u32,
    ) -> Result<Self, LayoutError> {
        // In u64: a peer's layout header may name any u32 widths.
        let total = u64::from(time_bits) + u64::from(worker_bits) + u64::from(seq_bits);
        if total != 63 {
            return Err(LayoutError::BitsDontAddUp(total));
        }
        if !(1..=20).contains(&worker_bits) {
            return Err(LayoutError::WorkerBits(worker_bits));
        }
        if !(1..=22).contains(&seq_bits) {
            return Err(LayoutError::SequenceBits(seq_bits));
        }
        if time_bits < 30 {
            return Err(LayoutError::TimeBits(time_bits));
        }
        Ok(Self {
            epoch_ms,
            time_bits,
            worker_bits,
            seq_bits,
        })
    }

    pub fn epoch_ms(&self) -> u64 {
        self.epoch_ms
    }

    pub fn max_workers(&self) -> u64 {
        1 << self.worker_bits
    }

    /// IDs one worker can issue per millisecond.
    pub fn per_ms(&self) -> u64 {
        1 << self.seq_bits
    }

    /// The last Unix millisecond the layout can encode.
    pub fn last_ms(&self) -> u64 {
        self.epoch_ms + ((1u64 << self.time_bits) - 1)
    }

    /// Years left before the time bits run out, negative once they have.
    pub fn years_left(&self, now_ms: u64) -> f64 {
        (self.last_ms() as f64 - now_ms as f64) / MS_PER_YEAR
    }

    fn compose(&self, ts_ms: u64, worker: u64, seq: u64) -> u64 {
        ((ts_ms - self.epoch_ms) << (self.worker_bits + self.seq_bits))
            | (worker << self.seq_bits)
            | seq
    }

    /// Splits an ID into (Unix ms, worker, sequence). `None` for IDs with
    /// the sign bit set, which this layout never produces.
    pub fn decode(&self, id: u64) -> Option<(u64, u64, u64)> {
        if id >> 63 != 0 {
            return None;
        }
        let seq = id & ((1 << self.seq_bits) - 1);
        let worker = (id >> self.seq_bits) & ((1 << self.worker_bits) - 1);
        let ts = (id >> (self.seq_bits + self.worker_bits)) + self.epoch_ms;
        Some((ts, worker, seq))
    }
}

/// How long another node's fence renewal stays news (see
/// [`Issuer::ahead_of_cluster`]). Nodes renew about every second (a 3 s
/// fence, renewed 2 s before it runs out); a clock that is right cannot
/// run past such a fence by the allowed 2 s within this, so a node that
/// stops hearing the others is never taken for one whose clock is ahead.
pub const CLUSTER_FRESH_MS: u64 = 2_500;

/// How long a node that starts knowing other nodes' fences only from its
/// disk waits to hear one of their renewals before it renews its own
/// regardless (see [`Issuer::awaits_cluster`]): longer than an election
/// and catching up on the log take (a snapshot's install counts as
/// hearing). After a restart of every node, none hears another before it
/// renews: each waits this long, and their first fences are not compared.
pub const CLUSTER_AWAIT_MS: u64 = 5_000;

/// Why IDs cannot be issued now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("this node holds no worker id yet (it acquires one through the Raft log)")]
    NoWorker,
    #[error("time fence reached: this node may stamp up to {fence_ms} but needs {needed_ms}; renewing the fence needs a majority")]
    FenceReached { fence_ms: u64, needed_ms: u64 },
    #[error("clock moved back by {by_ms} ms and is {behind_ms} ms behind the latest timestamp this worker may have stamped (its last one, or after a restart its last fence), more than the {limit_ms} ms that can be ridden out; refusing to issue until it catches up (after a restart with a lower snowflake.fence_ahead_ms, the old fence reads the same way until the clock passes it)")]
    ClockBackwards {
        /// Size of the step back, measured against the monotonic clock
        /// (equal to `behind_ms` when the step happened before this process
        /// started).
        by_ms: u64,
        behind_ms: u64,
        limit_ms: u64,
    },
    /// Calls asked for more than the layout's IDs per millisecond for long
    /// enough that the stamps ran as far ahead of the clock as a clock step
    /// may be ridden; the clock itself is fine.
    #[error("ID demand is above this node's {per_ms} IDs per millisecond: its stamps have run {ahead_ms} ms ahead of the clock, the most they may; retry after a pause, or spread calls over more nodes")]
    OverCapacity { per_ms: u64, ahead_ms: u64 },
    #[error("this node's clock is {ahead_ms} ms past the latest time fence another node committed (as this node knows them: one catching up after a restart may say so for a moment), more than the {limit_ms} ms allowed (max_ahead_of_cluster_ms): its clock is ahead of every other node's, or theirs are behind; refusing to issue, and to renew its fence, until they agree; another node may issue")]
    AheadOfCluster { ahead_ms: u64, limit_ms: u64 },
    #[error("the layout's time bits are exhausted")]
    LayoutExhausted,
    /// The wall clock reads a time the layout cannot stamp: it was set back
    /// before the epoch after the node started (which refuses to start so).
    #[error("the clock reads {now_ms} ms since 1970, before the ID layout's epoch ({epoch_ms}); refusing to issue until it is set right")]
    ClockBeforeEpoch { now_ms: u64, epoch_ms: u64 },
}

/// A forward step of the wall clock (against the monotonic clock), larger
/// than the backward steps that are ridden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardStep {
    /// Seen; the issuer's time goes on from before it until it has held for
    /// the trust period.
    Held { by_ms: u64 },
    /// Held for the trust period: the issuer's time follows it now.
    Believed { by_ms: u64 },
    /// The clock came back within the trust period: no stamp or fence
    /// followed the step.
    Undone { by_ms: u64 },
}

/// What the issuer noticed about the clock on a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockReport {
    /// The wall clock was this many ms behind the latest reading seen: a
    /// step back not reported yet (by this call, or by one that failed for
    /// another reason since), once; a step refused is reported by
    /// [`Issuer::take_refusal`] instead.
    pub stepped_back_ms: Option<u64>,
    /// Stamps came from the logical clock, ahead of the wall clock.
    pub rode: bool,
}

/// One node's ID issuer.
#[derive(Debug)]
pub struct Issuer {
    layout: Layout,
    /// Largest backward step (ms) carried on the logical clock.
    ride_ms: u64,
    /// How far ahead of the clock a fence reaches. Right after activation
    /// the floor (the last fence) may lie this far ahead of a correct clock,
    /// so starting there is ridden, not refused.
    fence_ahead_ms: u64,
    worker: Option<u64>,
    /// Set once this incarnation's own fence renewal has applied: every
    /// renewal of earlier holders or incarnations is then known (it precedes
    /// ours in the log) and folded into `floor`.
    active: bool,
    /// Highest Unix ms this node may stamp.
    fence_ms: u64,
    /// Stamps at or below this may have been used by an earlier holder.
    floor_ms: u64,
    /// Next free (timestamp, sequence).
    cursor: (u64, u64),
    /// Largest (wall clock − monotonic clock) seen: a wall clock that steps
    /// back shows as a drop below it, whatever time passed between calls.
    max_skew_ms: Option<i64>,
    /// The previous call's skew: a step is reported once, when it happens.
    last_skew_ms: Option<i64>,
    /// A step back seen and not yet reported (the call that saw it may have
    /// failed for another reason): the next call that issues reports it.
    unreported_step_ms: Option<u64>,
    /// The last call was refused for the clock.
    refusing: bool,
    /// The step (or gap) that began the current run of refusals for the
    /// clock, until [`Issuer::take_refusal`] reports it: logged and
    /// measured once, not per call refused.
    unreported_refusal_ms: Option<u64>,
    /// Highest wall clock reading seen.
    max_wall_ms: u64,
    /// How long (monotonic ms) a forward step larger than `ride_ms` must
    /// hold before the issuer's time follows it; 0: at once.
    trust_forward_ms: u64,
    /// The highest (wall clock − monotonic clock) believed: a reading above
    /// it by more than `ride_ms` is a forward step.
    believed_skew_ms: Option<i64>,
    /// A forward step not believed yet: the latest skew, and when
    /// (monotonic ms) the hold began.
    held_step: Option<(i64, u64)>,
    /// Forward steps seen and not yet taken by [`Issuer::take_forward_steps`].
    forward_steps: Vec<ForwardStep>,
    /// The highest time fence another node's worker committed, as known
    /// here: the other nodes' time plus up to a fence's reach.
    cluster_fence_ms: Option<u64>,
    /// When (monotonic ms) this node last learned of one as it happened
    /// (applied from the log, or from a snapshot), not from its own disk.
    cluster_heard_mono_ms: Option<u64>,
    /// When (monotonic ms) `cluster_fence_ms` was read from the disk.
    cluster_stored_mono_ms: Option<u64>,
    /// How far this issuer's time may run past `cluster_fence_ms`; 0: no
    /// limit.
    max_ahead_ms: u64,
}

impl Issuer {
    pub fn new(layout: Layout, ride_ms: u64, fence_ahead_ms: u64) -> Self {
        Self {
            layout,
            ride_ms,
            fence_ahead_ms,
            worker: None,
            active: false,
            fence_ms: 0,
            floor_ms: 0,
            cursor: (0, 0),
            max_skew_ms: None,
            last_skew_ms: None,
            unreported_step_ms: None,
            refusing: false,
            unreported_refusal_ms: None,
            max_wall_ms: 0,
            trust_forward_ms: 0,
            believed_skew_ms: None,
            held_step: None,
            forward_steps: Vec::new(),
            cluster_fence_ms: None,
            cluster_heard_mono_ms: None,
            cluster_stored_mono_ms: None,
            max_ahead_ms: 0,
        }
    }

    /// Believes a forward step of the wall clock larger than `ride_ms` only
    /// once it has held for `trust_forward_ms` (see [`Issuer::time_ms`]).
    pub fn with_trust_forward_ms(mut self, trust_forward_ms: u64) -> Self {
        self.trust_forward_ms = trust_forward_ms;
        self
    }

    pub fn with_max_ahead_of_cluster_ms(mut self, max_ahead_ms: u64) -> Self {
        self.max_ahead_ms = max_ahead_ms;
        self
    }

    /// The latest fence another node's worker committed, read from this
    /// node's own disk as it starts (at `mono_ms`): known, but maybe long
    /// past.
    pub fn stored_cluster_fence(&mut self, fence_ms: u64, mono_ms: u64) {
        self.raise_cluster_fence(fence_ms);
        self.cluster_stored_mono_ms = Some(mono_ms);
    }

    /// Another node's worker committed a time fence, learned as it
    /// happened (applied here, or in a snapshot), at `mono_ms`.
    pub fn cluster_fence(&mut self, fence_ms: u64, mono_ms: u64) {
        self.raise_cluster_fence(fence_ms);
        self.cluster_heard_mono_ms = Some(mono_ms);
    }

    fn raise_cluster_fence(&mut self, fence_ms: u64) {
        self.cluster_fence_ms = Some(self.cluster_fence_ms.map_or(fence_ms, |f| f.max(fence_ms)));
    }

    /// Whether this node must hear another node's fence renewal before it
    /// renews its own: other nodes hold workers, but what it knows of their
    /// fences comes from its disk, and its clock cannot be compared yet (a
    /// node restarted with its clock ahead would otherwise commit a fence
    /// before it caught up on the log). For [`CLUSTER_AWAIT_MS`] at most:
    /// after a restart of every node each waits for the others, and the
    /// nodes holding those workers may all be gone while the cluster runs
    /// on without them (nodes without a worker id): there is nothing to
    /// compare with then.
    pub fn awaits_cluster(&self, mono_ms: u64) -> bool {
        self.max_ahead_ms != 0
            && self.cluster_heard_mono_ms.is_none()
            && self
                .cluster_stored_mono_ms
                .is_some_and(|at| mono_ms.saturating_sub(at) < CLUSTER_AWAIT_MS)
    }

    /// How far `now_ms` (this issuer's time, from [`Issuer::time_ms`]) is
    /// past the latest fence another node committed, when that is more than
    /// allowed. A clock set ahead (at start, or a forward step believed)
    /// shows here before it stamps an ID or commits a fence: every other
    /// live node renews its fence ahead of its own clock. Compared only
    /// while that fence is news (heard within [`CLUSTER_FRESH_MS`] of
    /// `mono_ms`): a node cut off from the others, or paused, stops hearing
    /// their renewals, and stops at its own fence for that reason, not its
    /// clock's. Nothing is compared with no other node's fence known (one
    /// node, or none has renewed yet).
    pub fn ahead_of_cluster(&self, now_ms: u64, mono_ms: u64) -> Option<u64> {
        let cluster = self.cluster_fence_ms?;
        let heard = self.cluster_heard_mono_ms?;
        if self.max_ahead_ms == 0 || mono_ms.saturating_sub(heard) > CLUSTER_FRESH_MS {
            return None;
        }
        let ahead = now_ms.checked_sub(cluster)?;
        (ahead > self.max_ahead_ms).then_some(ahead)
    }

    /// The time this issuer stamps by and renews its fence by, from the
    /// wall and monotonic clocks: the wall clock, except after it stepped
    /// forward by more than `ride_ms` beyond any time believed before (a
    /// clock set back and then right again is not such a step). Such a step
    /// is believed once it has held for the trust period; until then the
    /// time goes on from the highest believed, on the monotonic clock
    /// (further steps while it is held join it, and it ends 60 s after the
    /// first). A step taken while that time lies so far behind the worker's
    /// floor that `issue` refuses is believed at once: the time it leaves
    /// is known to be behind (a node restarted with its clock behind its
    /// last fence, and set right). A clock set ahead by mistake and
    /// set right within that period so leaves no stamp and no fence ahead
    /// of the right time: stamps ahead would have the node refuse IDs until
    /// the clock caught up with them, and a fence ahead would hold back
    /// whoever holds the worker id next. Steps back are the wall clock's
    /// (ridden or refused by [`Issuer::issue`]).
    pub fn time_ms(&mut self, wall_ms: u64, mono_ms: u64) -> u64 {
        let skew = wall_ms as i64 - mono_ms as i64;
        let Some(believed) = self.believed_skew_ms else {
            self.believed_skew_ms = Some(skew);
            return wall_ms;
        };
        // At least the millisecond by which separately truncated readings
        // of the two clocks wobble.
        let slack = self.ride_ms.max(1) as i64;
        if skew <= believed + slack || self.trust_forward_ms == 0 {
            if let Some((held, _)) = self.held_step.take() {
                self.forward_steps.push(ForwardStep::Undone {
                    by_ms: (held - believed) as u64,
                });
            }
            // A step back leaves the highest believed where it was: it is
            // ridden or refused by `issue` against the stamps.
            self.believed_skew_ms = Some(believed.max(skew));
            return wall_ms;
        }
        let by_ms = (skew - believed) as u64;
        let time = mono_ms as i64 + believed;
        // Behind the floor by more than `issue` rides: it refuses IDs.
        let refused_behind_floor =
            self.floor_ms as i64 + 1 - time > (self.ride_ms + self.fence_ahead_ms) as i64;
        // A hold's period runs from its first step: steps that follow while
        // it is held (a clock slewed, or stepped again) join it.
        let since = match self.held_step {
            Some((_, since)) => since,
            None => {
                self.forward_steps.push(ForwardStep::Held { by_ms });
                mono_ms
            }
        };
        if refused_behind_floor || mono_ms.saturating_sub(since) >= self.trust_forward_ms {
            self.held_step = None;
            self.believed_skew_ms = Some(skew);
            self.forward_steps.push(ForwardStep::Believed { by_ms });
            return wall_ms;
        }
        self.held_step = Some((skew, since));
        time.max(0) as u64
    }

    /// Forward steps seen since the last call, oldest first.
    pub fn take_forward_steps(&mut self) -> Vec<ForwardStep> {
        std::mem::take(&mut self.forward_steps)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn worker(&self) -> Option<u64> {
        self.worker
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn fence_ms(&self) -> u64 {
        self.fence_ms
    }

    /// The worker id this node holds now, with the worker's fence, which
    /// becomes the floor. Issuing waits for [`Issuer::own_fence`].
    pub fn assign_worker(&mut self, worker: u64, fence_ms: u64) {
        if self.worker != Some(worker) {
            self.worker = Some(worker);
            self.active = false;
            self.fence_ms = 0;
            // This node's stamps never go back, under any worker id: the
            // last worker's may have run ahead of the clock (riding a step
            // back, or above a floor after a restart), and the new one's
            // fence may lie below them.
            self.floor_ms = self.floor_ms.max(self.cursor.0);
            self.cursor = (0, 0);
        }
        self.floor_ms = self.floor_ms.max(fence_ms);
    }

    /// The node lost its worker id (removed from the cluster).
    pub fn release_worker(&mut self) {
        self.worker = None;
        self.active = false;
        self.fence_ms = 0;
    }

    /// A fence renewal for our worker from an earlier incarnation (or an
    /// earlier holder) applied: stamps up to it may be taken. One above our
    /// own fence while we issue (learnt from a snapshot: while this node
    /// lagged, it was removed, another node held the worker id, and this
    /// node got it back) means stamps above ours were taken: issuing stops
    /// until our own renewal applies, and starts above it.
    pub fn foreign_fence(&mut self, fence_ms: u64) {
        if self.active && fence_ms > self.fence_ms {
            self.active = false;
        }
        if !self.active {
            self.floor_ms = self.floor_ms.max(fence_ms);
        }
    }

    /// This incarnation's own renewal applied: issue up to `fence_ms`.
    pub fn own_fence(&mut self, fence_ms: u64) {
        if self.worker.is_none() {
            return;
        }
        self.fence_ms = self.fence_ms.max(fence_ms);
        if !self.active {
            self.active = true;
            self.cursor = (self.floor_ms + 1, 0);
        }
    }

    /// How far the fence is ahead of the next stamp: `now_ms`, or the
    /// cursor when stamps run ahead of the clock (after a restart they
    /// start above the floor, the last fence, up to a fence's reach ahead;
    /// a snapshot holding this node's own renewal raises the floor to it).
    /// Negative when nothing can be stamped. Measured from the clock alone,
    /// a node whose stamps had reached its fence waited until the clock
    /// came within `renew_before_ms` of it to renew, refusing every call
    /// meanwhile (up to a second) while reporting itself serving.
    pub fn headroom_ms(&self, now_ms: u64) -> i64 {
        let next = if self.active {
            now_ms.max(self.cursor.0)
        } else {
            now_ms
        };
        self.fence_ms as i64 - next as i64
    }

    /// The fence a renewal should ask for, given how far ahead to reach.
    pub fn next_fence(&self, now_ms: u64, ahead_ms: u64) -> u64 {
        // Never lower than what is committed, and always above the floor.
        (now_ms + ahead_ms)
            .max(self.fence_ms)
            .max(self.floor_ms + 1)
    }

    /// How far the stamps may run ahead of the wall clock: `ride_ms`, plus
    /// how far the floor lies ahead of the clock, up to a fence's reach
    /// (right after a restart the floor, the last fence, may lie that far
    /// ahead of a correct clock, and stamps start above it).
    fn ride_limit(&self, now_ms: u64) -> u64 {
        let floor_gap = (self.floor_ms + 1)
            .saturating_sub(now_ms)
            .min(self.fence_ahead_ms);
        self.ride_ms + floor_gap
    }

    /// Why stamps at `ts` are too far ahead of `now_ms`: the clock fell
    /// behind readings already seen (or, while the node was down, behind
    /// its floor by more than a fence's reach), or calls asked for more
    /// than the layout's IDs per millisecond. The larger share names it.
    fn too_far_ahead(&self, ts: u64, now_ms: u64, step: Option<u64>) -> IdError {
        let floor = self.floor_ms + 1;
        let by_clock = self.max_wall_ms.saturating_sub(now_ms).max(
            floor
                .saturating_sub(now_ms)
                .saturating_sub(self.fence_ahead_ms),
        );
        let by_demand = ts.saturating_sub(self.max_wall_ms.max(floor));
        if by_demand > by_clock {
            IdError::OverCapacity {
                per_ms: self.layout.per_ms(),
                ahead_ms: ts - now_ms,
            }
        } else {
            IdError::ClockBackwards {
                by_ms: step.unwrap_or(ts - now_ms),
                behind_ms: ts - now_ms,
                limit_ms: self.ride_limit(now_ms),
            }
        }
    }

    /// Issues `count` IDs into `out`, all or none. `now_ms` is the wall
    /// clock; `mono_ms` any monotonic clock (only differences matter).
    pub fn issue(
        &mut self,
        now_ms: u64,
        mono_ms: u64,
        count: u64,
        out: &mut Vec<u64>,
    ) -> Result<ClockReport, IdError> {
        let result = self.stamp(now_ms, mono_ms, count, out);
        match result {
            Ok(mut report) => {
                self.refusing = false;
                report.stepped_back_ms = self.unreported_step_ms.take();
                Ok(report)
            }
            Err(IdError::ClockBackwards { by_ms, .. }) => {
                // A run of refusals begins, or the clock stepped further
                // back during one.
                if !self.refusing || self.unreported_step_ms.is_some() {
                    self.unreported_refusal_ms = Some(by_ms);
                }
                self.refusing = true;
                self.unreported_step_ms = None;
                result
            }
            Err(_) => result,
        }
    }

    /// The size of the step back that began refusals for the clock (or
    /// stepped further back during them), once: a clock that steps back
    /// 2 s on a node answering 10,000 calls a second is one event, not
    /// 20,000.
    pub fn take_refusal(&mut self) -> Option<u64> {
        self.unreported_refusal_ms.take()
    }

    fn stamp(
        &mut self,
        now_ms: u64,
        mono_ms: u64,
        count: u64,
        out: &mut Vec<u64>,
    ) -> Result<ClockReport, IdError> {
        let mut report = ClockReport::default();
        if count == 0 {
            return Ok(report);
        }
        let now_ms = self.time_ms(now_ms, mono_ms);
        let skew = now_ms as i64 - mono_ms as i64;
        let step = match self.max_skew_ms {
            // One millisecond of rounding is not a step.
            Some(max) if max - skew > 1 => Some((max - skew) as u64),
            _ => None,
        };
        // Kept for the call that reports it, not reported by every call
        // after (`issue`).
        if let (Some(last), Some(step)) = (self.last_skew_ms, step) {
            if last - skew > 1 {
                self.unreported_step_ms =
                    Some(self.unreported_step_ms.map_or(step, |u| u.max(step)));
            }
        }
        self.last_skew_ms = Some(skew);
        self.max_skew_ms = Some(self.max_skew_ms.map_or(skew, |m| m.max(skew)));
        self.max_wall_ms = self.max_wall_ms.max(now_ms);

        // Before the fence's check, and for a worker held but not active
        // yet: a node ahead renews no fence, so this is why it cannot issue.
        if let (Some(_), Some(ahead_ms)) = (self.worker, self.ahead_of_cluster(now_ms, mono_ms)) {
            return Err(IdError::AheadOfCluster {
                ahead_ms,
                limit_ms: self.max_ahead_ms,
            });
        }
        let worker = match (self.worker, self.active) {
            (Some(w), true) => w,
            _ => return Err(IdError::NoWorker),
        };
        let (mut ts, mut seq) = self.cursor;
        if now_ms > ts {
            (ts, seq) = (now_ms, 0);
        } else if ts - now_ms > self.ride_limit(now_ms) {
            return Err(self.too_far_ahead(ts, now_ms, step));
        } else if ts > now_ms {
            report.rode = true;
        }
        if ts < self.layout.epoch_ms {
            // Only a worker without stamps yet gets here (its cursor starts
            // at floor + 1, and a first holder's floor is 0); any other
            // refuses such a step as a step back. The stamp's offset from
            // the epoch would wrap.
            return Err(IdError::ClockBeforeEpoch {
                now_ms,
                epoch_ms: self.layout.epoch_ms,
            });
        }
        let per_ms = self.layout.per_ms();
        let last_ts = ts + (seq + count - 1) / per_ms;
        if last_ts > self.fence_ms {
            return Err(IdError::FenceReached {
                fence_ms: self.fence_ms,
                needed_ms: last_ts,
            });
        }
        if last_ts > self.layout.last_ms() {
            return Err(IdError::LayoutExhausted);
        }
        out.reserve(count as usize);
        for _ in 0..count {
            if seq == per_ms {
                ts += 1;
                seq = 0;
            }
            out.push(self.layout.compose(ts, worker, seq));
            seq += 1;
        }
        self.cursor = (ts, seq);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const EPOCH: u64 = 1_704_067_200_000;

    fn layout() -> Layout {
        Layout::try_new(EPOCH, 41, 10, 12).unwrap()
    }

    fn active(worker: u64, floor: u64, fence: u64) -> Issuer {
        let mut i = Issuer::new(layout(), 1_000, 3_000);
        i.assign_worker(worker, floor);
        i.own_fence(fence);
        i
    }

    /// Issues a millisecond's worth of IDs per call, with the clocks
    /// standing still, until the issuer refuses; returns why.
    fn issue_until_refused(i: &mut Issuer, now: u64, mono: u64, out: &mut Vec<u64>) -> IdError {
        loop {
            if let Err(e) = i.issue(now, mono, 4096, out) {
                return e;
            }
        }
    }

    /// An issuer whose time is past the latest fence another node committed,
    /// by more than allowed, issues nothing, held worker active or not;
    /// within the limit, with no other node's fence known, or with no limit
    /// (0), it issues.
    #[test]
    fn an_issuer_ahead_of_the_cluster_refuses() {
        let now = EPOCH + 1_000_000;
        let mut out = Vec::new();
        let mut i = active(1, 0, now + 100_000).with_max_ahead_of_cluster_ms(2_000);
        i.issue(now, 0, 1, &mut out).unwrap();
        i.cluster_fence(now - 1_000, 0);
        i.cluster_fence(now - 5_000, 0);
        assert_eq!(i.ahead_of_cluster(now, 0), None);
        i.issue(now, 0, 1, &mut out).unwrap();
        let ahead = IdError::AheadOfCluster {
            ahead_ms: 2_500,
            limit_ms: 2_000,
        };
        assert_eq!(i.ahead_of_cluster(now + 1_500, 1_500), Some(2_500));
        assert_eq!(i.issue(now + 1_500, 1_500, 1, &mut out), Err(ahead.clone()));
        // The others' fences move on: issuing again.
        i.cluster_fence(now + 3_000, 1_500);
        i.issue(now + 1_500, 1_500, 1, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        // Not heard from the others for a while (cut off, or paused): no
        // judgement of the clock; the node's own fence stops it.
        let later = now + 6_000;
        assert_eq!(
            i.ahead_of_cluster(later, 1_500 + CLUSTER_FRESH_MS),
            Some(3_000)
        );
        assert_eq!(i.ahead_of_cluster(later, 1_501 + CLUSTER_FRESH_MS), None);

        // A worker held, its own renewal not applied yet (a restart): only
        // its disk's fences known, it renews nothing until it hears one.
        let mut held = Issuer::new(layout(), 1_000, 3_000).with_max_ahead_of_cluster_ms(2_000);
        held.assign_worker(2, now - 10_000);
        held.stored_cluster_fence(now - 60_000, 0);
        assert!(held.awaits_cluster(0));
        assert!(held.awaits_cluster(CLUSTER_AWAIT_MS - 1));
        assert!(!held.awaits_cluster(CLUSTER_AWAIT_MS), "waits for ever");
        assert_eq!(held.ahead_of_cluster(now, 0), None);
        held.cluster_fence(now - 1_000, 0);
        assert!(!held.awaits_cluster(0));
        assert_eq!(held.issue(now + 1_500, 0, 1, &mut out), Err(ahead));
        // No worker: that is the reason given.
        let mut none = Issuer::new(layout(), 1_000, 3_000).with_max_ahead_of_cluster_ms(2_000);
        none.cluster_fence(now - 1_000, 0);
        assert_eq!(
            none.issue(now + 1_500, 0, 1, &mut out),
            Err(IdError::NoWorker)
        );
        // No other node's fence: nothing to wait for or compare with.
        assert!(!Issuer::new(layout(), 1_000, 3_000)
            .with_max_ahead_of_cluster_ms(2_000)
            .awaits_cluster(0));
        // No limit.
        let mut unlimited = active(3, 0, now + 100_000);
        unlimited.stored_cluster_fence(now - 60_000, 0);
        assert!(!unlimited.awaits_cluster(0));
        unlimited.cluster_fence(now - 60_000, 0);
        unlimited.issue(now, 0, 1, &mut out).unwrap();
    }

    /// A peer stream names its layout as text (`epoch.time.worker.seq`):
    /// it reads back as the same layout, and text that is not one is none.
    #[test]
    fn widths_that_overflow_a_u32_are_refused_not_wrapped() {
        let err = Layout::try_new(EPOCH, u32::MAX, 32, 32).unwrap_err();
        assert_eq!(err, LayoutError::BitsDontAddUp(u64::from(u32::MAX) + 64));
        let header = format!("{EPOCH}.{}.32.32", u32::MAX);
        assert_eq!(Layout::from_header(&header), None);
    }

    #[test]
    fn a_layout_reads_back_from_its_header() {
        let l = layout();
        assert_eq!(l.to_header(), "1704067200000.41.10.12");
        assert_eq!(Layout::from_header(&l.to_header()), Some(l));
        let other = Layout::try_new(EPOCH, 41, 11, 11).unwrap();
        assert_eq!(Layout::from_header(&other.to_header()), Some(other));
        for bad in [
            "",
            "1704067200000.41.10",
            "1704067200000.41.10.12.1",
            "x.41.10.12",
            "1.41.10.13",
        ] {
            assert_eq!(Layout::from_header(bad), None, "{bad:?}");
        }
    }

    /// A clock set back before the layout's epoch, on a worker that has
    /// stamped nothing yet (a first holder: floor 0), is refused by name;
    /// the stamp's offset from the epoch used to wrap (a panic in a debug
    /// build, IDs with the sign bit set in a release build).
    #[test]
    fn a_clock_before_the_epoch_is_refused_not_wrapped() {
        let now = EPOCH + 10_000;
        let mut i = active(1, 0, now + 3_000);
        let mut out = Vec::new();
        for before in [EPOCH - 1, 5_000] {
            assert_eq!(
                i.issue(before, 0, 1, &mut out),
                Err(IdError::ClockBeforeEpoch {
                    now_ms: before,
                    epoch_ms: EPOCH
                })
            );
        }
        assert!(out.is_empty());
        // Set right, the worker issues.
        i.issue(now, 10, 2, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|&id| layout().decode(id).unwrap().0 == now));
        // Once it has stamped, the same clock is a step back like any other.
        assert!(matches!(
            i.issue(5_000, 20, 1, &mut out),
            Err(IdError::ClockBackwards { .. })
        ));
    }

    #[test]
    fn demand_above_the_layout_is_over_capacity_not_a_clock_step() {
        let now = EPOCH + 10_000;
        let mut i = active(1, now - 1, now + 3_000);
        let mut out = Vec::new();
        // The clock stands still (no step back, just a burst within one ms):
        // the stamps borrow from the next milliseconds, up to the ride limit.
        let err = issue_until_refused(&mut i, now, 0, &mut out);
        // A whole ride limit (1,000 ms) of stamps was borrowed first.
        assert_eq!(out.len(), 1_002 * 4096);
        assert_eq!(
            err,
            IdError::OverCapacity {
                per_ms: 4096,
                ahead_ms: 1_001
            }
        );
        assert!(err
            .to_string()
            .contains("above this node's 4096 IDs per millisecond"));
        // Time passing lets it issue again, above everything issued.
        let last = *out.last().unwrap();
        i.issue(now + 2, 2, 1, &mut out).unwrap();
        assert!(*out.last().unwrap() > last);
        let unique: HashSet<u64> = out.iter().copied().collect();
        assert_eq!(unique.len(), out.len());
    }

    #[test]
    fn over_capacity_is_named_as_such_long_after_a_clock_step() {
        let now = EPOCH + 10_000;
        let mut i = active(1, 0, now + 10_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        // A 50 ms step back, ridden, reported once.
        let r = i.issue(now - 40, 10, 1, &mut out).unwrap();
        assert_eq!(r.stepped_back_ms, Some(50));
        let r = i.issue(now - 30, 20, 1, &mut out).unwrap();
        assert_eq!(r.stepped_back_ms, None, "a step is reported once");
        // Later, with the clock past every reading, a burst above the layout.
        let later = now + 100;
        let err = issue_until_refused(&mut i, later, 150, &mut out);
        assert!(matches!(err, IdError::OverCapacity { .. }), "{err:?}");
    }

    /// A snapshot holding this node's own first renewal makes that fence
    /// the floor as well: stamps start above it, so nothing can be stamped
    /// until the next renewal, and the headroom says so at once (it was
    /// the clock's distance to the fence, seconds).
    #[test]
    fn headroom_is_counted_from_the_next_stamp() {
        let now = EPOCH + 10_000;
        let fence = now + 2_900;
        let mut i = Issuer::new(layout(), 1_000, 3_000);
        i.assign_worker(1, fence);
        i.own_fence(fence);
        let mut out = Vec::new();
        let err = i.issue(now, 0, 1, &mut out).unwrap_err();
        assert!(matches!(err, IdError::FenceReached { .. }), "{err:?}");
        assert_eq!(i.headroom_ms(now), -1);
        // The renewal asked for then lets it issue.
        let next = i.next_fence(now, 3_000);
        assert_eq!(next, now + 3_000);
        i.own_fence(next);
        assert_eq!(i.headroom_ms(now), 99);
        i.issue(now, 0, 1, &mut out).unwrap();
        // Stamps behind the clock: counted from the clock.
        let mut j = active(1, now - 5_000, now + 3_000);
        j.issue(now - 4_000, 0, 1, &mut out).unwrap();
        assert_eq!(j.headroom_ms(now), 3_000);
        // Not issuing: from the clock (and renewed anyway).
        let mut k = Issuer::new(layout(), 1_000, 3_000);
        k.assign_worker(1, now + 2_000);
        assert_eq!(k.headroom_ms(now), -(now as i64));
    }

    #[test]
    fn a_quick_restart_issues_more_than_one_millisecond_of_ids() {
        // Restarted 1 s after its last fence renewal: the floor (that fence)
        // is 2 s ahead of a correct clock, and stamps start above it.
        let now = EPOCH + 10_000;
        let mut i = active(1, now + 2_000, now + 5_000);
        let mut out = Vec::new();
        for _ in 0..100 {
            i.issue(now, 0, 4096, &mut out).unwrap();
        }
        let (ts, _, _) = layout().decode(*out.last().unwrap()).unwrap();
        assert_eq!(ts, now + 2_100);
        // Demand that outruns the ride limit above the floor is over
        // capacity, not a clock step (the clock is fine).
        let err = issue_until_refused(&mut i, now, 0, &mut out);
        assert!(matches!(err, IdError::OverCapacity { .. }), "{err:?}");
    }

    #[test]
    fn a_new_worker_id_stamps_above_the_last_ones() {
        // Stamps ran 2 s ahead of the clock (the floor after a restart);
        // then the node is removed, added back and given another worker id,
        // whose fence lies below those stamps.
        let now = EPOCH + 10_000;
        let mut i = active(1, now + 2_000, now + 5_000);
        let mut out = Vec::new();
        i.issue(now, 0, 10, &mut out).unwrap();
        let (last, _, _) = layout().decode(*out.last().unwrap()).unwrap();
        i.release_worker();
        i.assign_worker(2, now - 1);
        i.own_fence(now + 3_000);
        out.clear();
        i.issue(now + 1, 1, 1, &mut out).unwrap();
        let (ts, worker, _) = layout().decode(out[0]).unwrap();
        assert_eq!(worker, 2);
        assert!(
            ts > last,
            "stamped {ts} after {last} under the last worker id"
        );
    }

    #[test]
    fn a_fence_of_another_holder_above_ours_stops_issuing_until_our_renewal() {
        let now = EPOCH + 10_000;
        let mut i = active(3, now - 1, now + 3_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        // Another holder of worker 3 renewed to now + 3.5 s (and may have
        // stamped up to it).
        i.foreign_fence(now + 3_500);
        assert!(!i.is_active());
        assert_eq!(i.issue(now + 1, 1, 1, &mut out), Err(IdError::NoWorker));
        assert!(i.next_fence(now, 3_000) > now + 3_500);
        i.own_fence(now + 6_500);
        out.clear();
        i.issue(now + 2, 2, 1, &mut out).unwrap();
        let (ts, _, _) = layout().decode(out[0]).unwrap();
        assert!(
            ts > now + 3_500,
            "stamped {ts}, at or below the other holder's fence"
        );
        // A renewal at or below our own fence changes nothing.
        i.foreign_fence(now + 6_000);
        assert!(i.is_active());
    }

    #[test]
    fn default_layout_has_decades_left() {
        let l = layout();
        let years = l.years_left(EPOCH + 2 * 365 * 86_400_000);
        assert!((67.0..68.0).contains(&years), "{years}");
        assert_eq!(l.per_ms(), 4096);
        assert_eq!(l.max_workers(), 1024);
        assert!(Layout::try_new(EPOCH, 41, 10, 13).is_err());
        assert!(Layout::try_new(EPOCH, 41, 0, 22).is_err());
    }

    #[test]
    fn ids_decode_to_their_parts() {
        let now = EPOCH + 123_456;
        let mut i = active(7, now - 10, now + 3_000);
        let mut out = Vec::new();
        i.issue(now, now, 2, &mut out).unwrap();
        assert_eq!(layout().decode(out[0]), Some((now, 7, 0)));
        assert_eq!(layout().decode(out[1]), Some((now, 7, 1)));
        assert_eq!(layout().decode(u64::MAX), None);
    }

    #[test]
    fn nothing_at_or_below_the_floor() {
        let now = EPOCH + 10_000;
        // The previous holder's fence is 500 ms in the future.
        let mut i = active(1, now + 500, now + 3_000);
        let mut out = Vec::new();
        i.issue(now, now, 1, &mut out).unwrap();
        let (ts, _, _) = layout().decode(out[0]).unwrap();
        assert_eq!(ts, now + 501);
    }

    #[test]
    fn stops_at_the_fence() {
        let now = EPOCH + 10_000;
        let mut i = active(1, 0, now + 1);
        let mut out = Vec::new();
        // 4096 per ms: two ms of room.
        i.issue(now, now, 8192, &mut out).unwrap();
        let err = i.issue(now, now, 1, &mut out).unwrap_err();
        assert!(matches!(err, IdError::FenceReached { .. }), "{err}");
        assert_eq!(out.len(), 8192, "a refused call issues nothing");
    }

    fn stamp(id: u64) -> u64 {
        layout().decode(id).unwrap().0
    }

    /// A clock set an hour ahead by mistake and set right 5 s later: the
    /// issuer's time went on from before the step, so the stamps and the
    /// fence stayed at the right time, and once the clock is right nothing
    /// is refused. (Believed at once, the stamps an hour ahead had the node
    /// refuse IDs for that hour, and the fence held back the worker id's
    /// next holder as long.)
    #[test]
    fn a_forward_step_set_right_within_the_trust_period_leaves_nothing_ahead() {
        let now = EPOCH + 10_000;
        let hour = 3_600_000;
        let mut i = active(1, 0, now + 3_000).with_trust_forward_ms(10_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        assert!(i.take_forward_steps().is_empty());
        for mono in (100..5_000).step_by(100) {
            i.issue(now + hour + mono, mono, 1, &mut out).unwrap();
            let time = i.time_ms(now + hour + mono, mono);
            assert_eq!(time, now + mono, "the time before the step goes on");
            assert_eq!(i.next_fence(time, 3_000), now + mono + 3_000);
            i.own_fence(now + mono + 3_000);
        }
        assert_eq!(
            i.take_forward_steps(),
            vec![ForwardStep::Held { by_ms: hour }]
        );
        assert!(
            out.iter().all(|id| stamp(*id) < now + 5_000),
            "no stamp ahead"
        );
        // Set right: no step back is seen, and issuing goes on.
        let r = i.issue(now + 5_000, 5_000, 1, &mut out).unwrap();
        assert_eq!(r.stepped_back_ms, None);
        assert_eq!(
            i.take_forward_steps(),
            vec![ForwardStep::Undone { by_ms: hour }]
        );
        assert!(out.windows(2).all(|w| w[0] < w[1]));
    }

    /// A clock set back an hour and then right again steps forward to a
    /// time believed before: issuing resumes at once, as before there was
    /// a trust period.
    #[test]
    fn a_clock_set_back_and_right_again_is_not_held() {
        let now = EPOCH + 10_000;
        let hour = 3_600_000;
        let mut i = active(1, 0, now + 100_000).with_trust_forward_ms(10_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        let err = i.issue(now - hour + 100, 100, 1, &mut out).unwrap_err();
        assert!(matches!(err, IdError::ClockBackwards { .. }), "{err}");
        i.issue(now + 200, 200, 1, &mut out).unwrap();
        assert_eq!(stamp(out[1]), now + 200);
        assert!(i.take_forward_steps().is_empty());
    }

    /// Restarted with its clock 10 s behind its floor (the last fence), the
    /// node refuses IDs; set right, the clock is believed at once.
    #[test]
    fn a_clock_behind_the_floor_set_right_is_believed_at_once() {
        let now = EPOCH + 100_000;
        let mut i = active(1, now + 2_000, now + 100_000).with_trust_forward_ms(10_000);
        let mut out = Vec::new();
        let err = i.issue(now - 10_000, 0, 1, &mut out).unwrap_err();
        assert!(matches!(err, IdError::ClockBackwards { .. }), "{err}");
        i.issue(now + 100, 100, 1, &mut out).unwrap();
        assert_eq!(stamp(out[0]), now + 2_001);
        assert_eq!(
            i.take_forward_steps(),
            vec![
                ForwardStep::Held { by_ms: 10_000 },
                ForwardStep::Believed { by_ms: 10_000 }
            ]
        );
    }

    /// Restarted 600 ms after a fence renewed 3 s ahead, the floor lies
    /// 2.4 s ahead of a right clock (ridden, not refused): a step forward
    /// then is held as any other.
    #[test]
    fn a_quick_restart_holds_a_step_forward() {
        let now = EPOCH + 100_000;
        let mut i = active(1, now + 2_400, now + 100_000).with_trust_forward_ms(10_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        i.issue(now + 3_600_000 + 100, 100, 1, &mut out).unwrap();
        assert_eq!(stamp(out[1]), now + 2_401, "ridden on from the floor");
        assert_eq!(
            i.take_forward_steps(),
            vec![ForwardStep::Held { by_ms: 3_600_000 }]
        );
    }

    /// Steps that follow while one is held join its period, which runs
    /// from the first: a clock stepped forward every few seconds is
    /// believed 10 s after the first step, not never.
    #[test]
    fn steps_while_one_is_held_join_its_period() {
        let now = EPOCH + 10_000;
        let mut i = active(1, 0, now + 100_000).with_trust_forward_ms(10_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        for (k, mono) in (1..=5u64).zip([2_000u64, 4_000, 6_000, 8_000, 9_999]) {
            i.issue(now + k * 2_000 + mono, mono, 1, &mut out).unwrap();
            assert_eq!(stamp(*out.last().unwrap()), now + mono, "held");
        }
        // Still held at 9,999 ms after the first step; believed at 10,000.
        i.issue(now + 10_000 + 11_999, 11_999, 1, &mut out).unwrap();
        assert_eq!(stamp(*out.last().unwrap()), now + 11_999, "held");
        i.issue(now + 10_000 + 12_000, 12_000, 1, &mut out).unwrap();
        assert_eq!(stamp(*out.last().unwrap()), now + 22_000, "believed");
        assert_eq!(
            i.take_forward_steps(),
            vec![
                ForwardStep::Held { by_ms: 2_000 },
                ForwardStep::Believed { by_ms: 10_000 }
            ]
        );
    }

    /// With no ride at all, the millisecond by which the two clocks'
    /// readings wobble is not a step.
    #[test]
    fn a_millisecond_of_wobble_is_not_a_step() {
        let now = EPOCH + 10_000;
        let mut i = Issuer::new(layout(), 0, 3_000).with_trust_forward_ms(10_000);
        i.assign_worker(1, 0);
        i.own_fence(now + 100_000);
        let mut out = Vec::new();
        for mono in 0..1_000u64 {
            i.issue(now + mono + mono % 2, mono, 1, &mut out).unwrap();
        }
        assert!(i.take_forward_steps().is_empty());
    }

    /// A forward step that holds for the trust period is believed: stamps
    /// jump to it. One within `ride_ms` is believed at once, and with no
    /// trust period every step is.
    #[test]
    fn a_forward_step_that_holds_is_believed() {
        let now = EPOCH + 10_000;
        let mut i = active(1, 0, now + 100_000).with_trust_forward_ms(10_000);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        // Within ride_ms (1 s): at once.
        i.issue(now + 100 + 900, 100, 1, &mut out).unwrap();
        assert_eq!(stamp(out[1]), now + 1_000);
        assert!(i.take_forward_steps().is_empty());
        // 30 s ahead, slewed by a few ms while it holds.
        i.issue(now + 31_000 + 200, 200, 1, &mut out).unwrap();
        assert_eq!(stamp(out[2]), now + 1_100);
        i.issue(now + 31_003 + 10_199, 10_199, 1, &mut out).unwrap();
        assert_eq!(stamp(out[3]), now + 1_000 + 10_099, "still held");
        i.issue(now + 31_005 + 10_200, 10_200, 1, &mut out).unwrap();
        assert_eq!(stamp(out[4]), now + 31_005 + 10_200, "believed");
        assert_eq!(
            i.take_forward_steps(),
            vec![
                ForwardStep::Held { by_ms: 30_100 },
                ForwardStep::Believed { by_ms: 30_105 }
            ]
        );
        // No trust period: believed at once.
        let mut i = active(1, 0, now + 100_000);
        i.issue(now, 0, 1, &mut out).unwrap();
        i.issue(now + 30_000 + 100, 100, 1, &mut out).unwrap();
        assert_eq!(stamp(*out.last().unwrap()), now + 30_100);
        assert!(i.take_forward_steps().is_empty());
    }

    #[test]
    fn small_rollback_is_ridden_large_one_refused() {
        let now = EPOCH + 10_000;
        let mut i = active(1, 0, now + 10_000);
        let mut out = Vec::new();
        // The monotonic clock runs on while the wall clock steps back.
        i.issue(now, 0, 1, &mut out).unwrap();
        let r = i.issue(now - 50 + 10, 10, 1, &mut out).unwrap();
        assert_eq!(r.stepped_back_ms, Some(50));
        assert!(r.rode);
        // 2 s back, noticed 300 ms later: the step is named, not the gap.
        let err = i.issue(now - 2_000 + 300, 300, 1, &mut out).unwrap_err();
        assert_eq!(
            err,
            IdError::ClockBackwards {
                by_ms: 2_000,
                behind_ms: 1_700,
                limit_ms: 1_000
            }
        );
        assert!(err.to_string().contains("moved back by 2000 ms"));
        // Once the clock catches up, issuing resumes above everything.
        i.issue(now + 1, 2_301, 1, &mut out).unwrap();
        let stamps: Vec<u64> = out
            .iter()
            .map(|id| layout().decode(*id).unwrap().0)
            .collect();
        assert!(stamps.windows(2).all(|w| w[0] <= w[1]));
        assert!(out.windows(2).all(|w| w[0] < w[1]));
    }

    /// A step back is reported once: by the first call that issues after
    /// it, even when the call that saw it failed for another reason; a
    /// step refused is reported once per run of refused calls (by
    /// `take_refusal`), not per call, and not again as ridden.
    #[test]
    fn each_step_back_is_reported_once() {
        let now = EPOCH + 20_000;
        let mut i = active(1, now - 10_000, now + 100);
        let mut out = Vec::new();
        i.issue(now, 0, 1, &mut out).unwrap();
        // 50 ms back, seen by a call past the fence.
        let err = i.issue(now - 40, 10, 4096 * 200, &mut out).unwrap_err();
        assert!(matches!(err, IdError::FenceReached { .. }), "{err:?}");
        let r = i.issue(now - 39, 11, 1, &mut out).unwrap();
        assert_eq!(r.stepped_back_ms, Some(50));
        assert!(r.rode);
        assert_eq!(
            i.issue(now - 38, 12, 1, &mut out).unwrap().stepped_back_ms,
            None
        );

        // 2 s back: every call refused, the step reported once.
        i.own_fence(now + 5_000);
        for mono in 20..25 {
            let err = i.issue(now - 2_000 + mono, mono, 1, &mut out).unwrap_err();
            assert!(matches!(err, IdError::ClockBackwards { .. }), "{err:?}");
            assert_eq!(i.take_refusal(), (mono == 20).then_some(2_000), "{mono}");
        }
        // Further back during the run: reported too.
        let err = i.issue(now - 2_500 + 30, 30, 1, &mut out).unwrap_err();
        assert!(matches!(err, IdError::ClockBackwards { .. }), "{err:?}");
        assert_eq!(i.take_refusal(), Some(2_500));
        assert!(i.issue(now - 2_500 + 31, 31, 1, &mut out).is_err());
        assert_eq!(i.take_refusal(), None);
        // Caught up: issuing again, the refused step not reported as ridden.
        let r = i.issue(now - 2_500 + 2_470, 2_470, 1, &mut out).unwrap();
        assert_eq!(r.stepped_back_ms, None);
        // A second run of refusals is a second report.
        let err = i
            .issue(now - 2_500 + 2_480 - 3_000, 2_480, 1, &mut out)
            .unwrap_err();
        assert!(matches!(err, IdError::ClockBackwards { .. }), "{err:?}");
        // Measured, as every step, against the highest skew seen.
        assert_eq!(i.take_refusal(), Some(5_500));
    }

    #[test]
    fn a_quick_restart_rides_from_the_floor_a_clock_far_behind_is_refused() {
        let now = EPOCH + 10_000;
        // The last fence reached 2.5 s ahead; the node is back within 1 s.
        let mut i = active(1, now + 2_500, now + 6_000);
        let mut out = Vec::new();
        let r = i.issue(now, 0, 1, &mut out).unwrap();
        assert!(r.rode);
        assert_eq!(layout().decode(out[0]).unwrap().0, now + 2_501);
        // Restarted with the clock 10 s behind: refused, naming the gap.
        let mut i = active(1, now + 2_500, now + 6_000);
        let err = i.issue(now - 10_000, 0, 1, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                IdError::ClockBackwards {
                    behind_ms: 12_501,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn inactive_until_own_renewal() {
        let mut i = Issuer::new(layout(), 1_000, 3_000);
        let mut out = Vec::new();
        assert_eq!(i.issue(EPOCH + 5, 0, 1, &mut out), Err(IdError::NoWorker));
        i.assign_worker(3, EPOCH + 100);
        i.foreign_fence(EPOCH + 900);
        assert_eq!(i.issue(EPOCH + 5, 0, 1, &mut out), Err(IdError::NoWorker));
        i.own_fence(EPOCH + 3_000);
        i.issue(EPOCH + 1_000, 995, 1, &mut out).unwrap();
        assert_eq!(layout().decode(out[0]).unwrap().0, EPOCH + 1_000);
    }

    proptest! {
        /// A worker handed from incarnation to incarnation (restarts, clock
        /// jumps of any size) never issues the same ID twice, and each
        /// incarnation's IDs increase.
        #[test]
        fn unique_across_incarnations_and_clock_jumps(
            steps in proptest::collection::vec((-3_000i64..3_000, 1u64..5_000, any::<bool>()), 1..200)
        ) {
            let mut seen = HashSet::new();
            let mut committed_fence = EPOCH;
            let mut clock = EPOCH as i64 + 1_000_000;
            let mut i = Issuer::new(layout(), 1_000, 3_000);
            i.assign_worker(5, committed_fence);
            let mut prev = 0;
            for (jump, count, restart) in steps {
                clock += jump;
                let now = clock as u64;
                if restart {
                    // A new incarnation: only the committed fence survives.
                    i = Issuer::new(layout(), 1_000, 3_000);
                    i.assign_worker(5, committed_fence);
                    prev = 0;
                }
                if !i.is_active() || i.headroom_ms(now) < 1_000 {
                    let f = i.next_fence(now, 3_000).max(committed_fence + 1);
                    committed_fence = committed_fence.max(f);
                    i.own_fence(f);
                }
                let mut out = Vec::new();
                if i.issue(now, 0, count, &mut out).is_ok() {
                    for id in out {
                        prop_assert!(seen.insert(id), "duplicate id {id}");
                        prop_assert!(id > prev, "ids of one incarnation increase");
                        prev = id;
                    }
                }
            }
        }
    }
}
