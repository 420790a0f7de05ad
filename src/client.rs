//! The Rust client: finds the leader, follows `seqd-leader-addr` hints and
//! retries with backoff until an overall deadline.
//!
//! Retrying `Next` is safe for I1: a call that failed in flight may have
//! taken numbers that are never returned (a hole), never numbers that are
//! returned twice. Every `Next` or `NextBatch` this client sends carries a
//! request id (its own when the caller gave none), kept by its retries, so
//! a retry that reaches the same leader gets the ranges the lost attempt
//! got (no hole); after a leader change a segmented call gets new ones,
//! while a dense call's record, kept in the replicated state, still gives
//! the old. An answer repeated from a record has `replayed` set (on every
//! call of a coalesced batch): a hole just below its range under the same
//! epoch may be numbers no call got, not a lost message. A single call
//! given its own `request_id` goes on its own.
//!
//! # Coalescing
//!
//! Concurrent [`Client::next`] calls of one namespace share RPCs: while
//! [`ClientOptions::max_in_flight`] RPCs are already on the wire, or the
//! newest went out less than [`ClientOptions::rpc_spacing`] ago and fewer
//! than [`ClientOptions::rpc_fill`] calls are queued, new calls queue, and
//! the next RPC carries every queued call (one `NextBatch`, each
//! key at most once per batch). At low load nothing waits; at high load one
//! RPC (one gRPC frame, one leadership round on the server) serves many
//! callers, as a pipelining Redis client does. When an RPC's answer comes,
//! the task that sent it lets the callers it answered run before it takes
//! the queue, so those that call again at once leave together in its next
//! RPC rather than one ahead and the rest a round trip behind. I2 holds: a
//! call that starts after another completed goes out in a later RPC than
//! the one that served it, and the server orders RPCs. Every caller gets
//! its own answer when the server refuses a batch as a whole (allocating
//! nothing): a refused key fails that key's calls, naming their own field
//! (`key`), and the rest go again as one batch; a refused namespace fails
//! every call; any other refusal (a summed count over the limit) is
//! retried call by call. A queued call whose caller gave up (dropped its
//! future) before an RPC took it is not sent: its numbers would be taken
//! and never returned.
//!
//! Concurrent [`Client::next_ids`] calls share RPCs the same way, in a lane
//! of their own: one `NextIds` asks for their summed count and each caller
//! gets its slice, in queue order (strictly increasing, like any call's
//! IDs). Batches travel on the node's `NextStream`, ID calls on its
//! `NextIdsStream` (a node without one gets the unary RPCs). Any node issues IDs, so they go to one node of the client's own
//! (spread over the endpoints by the client's random prefix), and to the
//! next when that one cannot issue or refuses.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pb::admin_client::AdminClient;
use crate::pb::ids_client::IdsClient;
use crate::pb::sequencer_client::SequencerClient;
use crate::pb::{
    BatchItem, CurrentRequest, NextBatchRequest, NextBatchResponse, NextIdsRequest,
    NextIdsResponse, NextIdsStreamReply, NextIdsStreamRequest, NextRequest, NextResponse,
    NextStreamReply, NextStreamRequest, StatusRequest, StatusResponse, StreamError,
};

/// Response metadata naming the leader's address (set by a follower).
pub const LEADER_ADDR_HEADER: &str = "seqd-leader-addr";
/// Largest API message a node or this client decodes: a `NextBatch` of
/// 10,000 items with 4,096-byte keys (and its reply, which names them) is
/// about 41 MB, and the reply to `NextIds` of the most IDs a node may be
/// configured to hand out at once (1,000,000) about 10 MB. gRPC's usual
/// 4 MiB would refuse such calls with OUT_OF_RANGE, after a node had
/// handed out their numbers. (A node reads `Ids` requests, a few varints,
/// with the usual 4 MiB.)
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

fn sequencer(ch: Channel) -> SequencerClient<Channel> {
    SequencerClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn ids(ch: Channel) -> IdsClient<Channel> {
    IdsClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES)
}
/// Response metadata naming the leader's node id.
pub const LEADER_ID_HEADER: &str = "seqd-leader-id";

/// Client tuning.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Give up on a call after this long from when it was made: time
    /// queued behind other RPCs and retries included. (A coalesced RPC
    /// retries until the first of its calls is due.)
    pub overall_timeout: Duration,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// First and largest pause between attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// RPCs of coalesced `next` calls on the wire at once, per namespace
    /// (and of coalesced `next_ids` calls); 0 sends every call on its own.
    pub max_in_flight: usize,
    /// While an RPC of coalesced calls is on the wire, another starts only
    /// once the newest has been out this long; until then calls queue for
    /// the RPC after the current one. Fewer, fuller RPCs at moderate load
    /// (less CPU on both sides), while a slow RPC (a cold key waiting for
    /// its first ceiling) cannot hold the calls behind it much longer than
    /// this (a timer sends them; tokio's timer rounds up to a millisecond).
    /// Zero: a new RPC whenever fewer than `max_in_flight` are out.
    pub rpc_spacing: Duration,
    /// Once this many calls are queued they go at once (a slot free),
    /// spacing or not: they fill an RPC well enough that waiting for the
    /// spacing would save little CPU and cost them a round trip. Under a
    /// steady closed loop this puts a second RPC on the wire while the
    /// first is out, instead of one RPC going back and forth with every
    /// caller on it. 0: only the spacing decides.
    pub rpc_fill: usize,
    /// An HTTP/2 PING after this long without a frame from a node, on a
    /// connection with calls or streams open (the client's call streams
    /// stay open, so an idle client PINGs each node it has called about
    /// this often; a busy connection sends none); zero sends none. A node
    /// that stops answering without closing its connection (a hung process,
    /// a link that drops packets) would otherwise keep it, and every stream
    /// an attempt timed out on, until TCP gives up, minutes later.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped:
    /// its streams end and the next call to that node connects afresh.
    /// Twice the attempt timeout by default: a node (or this client's
    /// runtime) stalled this long has failed its calls already, and one
    /// stalled for less keeps its connection.
    pub keepalive_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            overall_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(500),
            max_in_flight: 4,
            rpc_spacing: Duration::from_millis(1),
            rpc_fill: 8,
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0:?}")]
    BadEndpoint(String),
    #[error("bad client options: {0}")]
    BadOptions(&'static str),
    /// The server answered with an error that retrying cannot fix.
    #[error("{}: {}", .0.code(), .0.message())]
    Rejected(Status),
    /// Every attempt failed until the overall deadline; the last error.
    #[error("gave up after {attempts} attempts: {}: {}", .last.code(), .last.message())]
    Exhausted { attempts: u32, last: Status },
}

impl ClientError {
    /// The gRPC code of the (last) failure, if any.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Rejected(s) | Self::Exhausted { last: s, .. } => Some(s.code()),
            _ => None,
        }
    }
}

/// A client for a seqd cluster. Cheap to share between tasks.
pub struct Client {
    inner: Arc<Inner>,
}

/// What the client's calls share. Coalesced RPCs run on spawned tasks, so a
/// caller that gives up never strands the calls riding with it.
struct Inner {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Address of the node believed to lead.
    leader: Mutex<Option<String>>,
    /// Node id → endpoint, learned from the nodes' status: a leader hint
    /// names an address as the cluster sees it (e.g. a compose hostname),
    /// which this client may not reach; its id maps to an endpoint it can.
    ids: Mutex<HashMap<u64, String>>,
    /// When the nodes were last asked for their ids.
    ids_asked: Mutex<Option<Instant>>,
    opts: ClientOptions,
    /// Namespace → its coalesced `next` calls.
    lanes: Mutex<HashMap<String, Lane<Seqs>>>,
    /// The coalesced `next_ids` calls: one lane, named "".
    ids_lanes: Mutex<HashMap<String, Lane<Ids>>>,
    /// Index (modulo the endpoints) of the node this client asks for IDs.
    ids_node: AtomicUsize,
    /// Each node's `NextStream`, which carries coalesced batches.
    streams: StreamTable<Batches>,
    /// Each node's `NextIdsStream`, which carries coalesced ID calls (a
    /// node may have one stream and not the other).
    id_streams: StreamTable<IdCalls>,
    /// [`NO_STREAM_RECHECK`] (shorter in tests).
    no_stream_recheck: Duration,
    /// Request ids of calls given none: this client's random prefix and a
    /// counter.
    request_ids: (u64, std::sync::atomic::AtomicU64),
}

/// A number that differs between clients (processes, and clients of one
/// process): the prefix of their batches' request ids.
fn client_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS once per thread and stepped per
    // instance; time and process id make a collision across machines as
    // unlikely as across threads.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// What a lane coalesces: the calls it queues and how one RPC answers a
/// batch of them. `next` calls queue per namespace ([`Seqs`]), `next_ids`
/// calls in a lane of their own ([`Ids`]).
trait Calls: Sized + 'static {
    type Waiter: Queued + Send + 'static;
    type Batch: Send + 'static;
    /// The client's lanes of this kind.
    fn lanes(inner: &Inner) -> &Mutex<HashMap<String, Lane<Self>>>;
    /// What the next RPC carries, taken from `queued` (pruned first);
    /// what does not fit stays queued, in order.
    fn take(queued: &mut Vec<Self::Waiter>) -> Self::Batch;
    /// Sends `batch` (with retries) and answers each of its calls.
    fn serve<'a>(
        inner: &'a Inner,
        lane: &'a str,
        batch: Self::Batch,
    ) -> impl Future<Output = ()> + Send + 'a;
}

/// `next` calls, a lane per namespace.
struct Seqs;

impl Calls for Seqs {
    type Waiter = Waiter;
    type Batch = Vec<Item>;

    fn lanes(inner: &Inner) -> &Mutex<HashMap<String, Lane<Self>>> {
        &inner.lanes
    }

    fn take(queued: &mut Vec<Waiter>) -> Vec<Item> {
        prune(queued, Instant::now());
        take_batch(queued)
    }

    fn serve<'a>(
        inner: &'a Inner,
        namespace: &'a str,
        batch: Vec<Item>,
    ) -> impl Future<Output = ()> + Send + 'a {
        inner.serve_batch(namespace, batch)
    }
}

/// `next_ids` calls, one lane.
struct Ids;

impl Calls for Ids {
    type Waiter = IdsWaiter;
    type Batch = Vec<IdsWaiter>;

    fn lanes(inner: &Inner) -> &Mutex<HashMap<String, Lane<Self>>> {
        &inner.ids_lanes
    }

    fn take(queued: &mut Vec<IdsWaiter>) -> Vec<IdsWaiter> {
        prune(queued, Instant::now());
        take_ids(queued)
    }

    fn serve<'a>(
        inner: &'a Inner,
        _: &'a str,
        batch: Vec<IdsWaiter>,
    ) -> impl Future<Output = ()> + Send + 'a {
        inner.serve_ids(batch)
    }
}

/// One lane's queued calls, and how many of its RPCs are on the wire.
struct Lane<C: Calls> {
    queued: Vec<C::Waiter>,
    in_flight: usize,
    /// When the newest RPC went out.
    last_sent: Option<Instant>,
    /// A task will look at the queue once the spacing has passed.
    timer_armed: bool,
    /// Drivers whose RPC was answered and that take the queue for their
    /// next RPC once the callers they answered have run (see `drive_lane`).
    /// While one is, a new call just queues: it rides that RPC.
    gathering: usize,
}

impl<C: Calls> Default for Lane<C> {
    fn default() -> Self {
        Self {
            queued: Vec::new(),
            in_flight: 0,
            last_sent: None,
            timer_armed: false,
            gathering: 0,
        }
    }
}

impl<C: Calls> Lane<C> {
    /// Takes a slot and the queued calls for a new RPC, if there are any
    /// and one may start at `now`. With nothing out a call goes at once. With RPCs out, queued
    /// calls always have a sender that looks at the queue when its answer
    /// comes (see `Slot`), so they may wait for it: they do while every slot
    /// is taken, or the newest RPC went out less than `rpc_spacing` ago and
    /// fewer than `rpc_fill` calls are queued.
    fn start_rpc(&mut self, opts: &ClientOptions, now: Instant) -> Option<C::Batch> {
        let spaced = self.in_flight == 0
            || (opts.rpc_fill > 0 && self.queued.len() >= opts.rpc_fill)
            || self
                .last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= opts.rpc_spacing);
        if self.queued.is_empty()
            || self.gathering > 0
            || self.in_flight >= opts.max_in_flight
            || !spaced
        {
            return None;
        }
        self.in_flight += 1;
        self.last_sent = Some(now);
        Some(C::take(&mut self.queued))
    }

    /// Calls queued only for the spacing (a slot is free) must not wait
    /// for a slow RPC's answer: unless a timer is already armed, arms one
    /// and returns when it should fire. (Calls queued because every slot is
    /// taken are picked up as answers come.)
    fn arm_spacing_timer(&mut self, opts: &ClientOptions, now: Instant) -> Option<Duration> {
        if self.timer_armed
            || self.queued.is_empty()
            || self.gathering > 0
            || self.in_flight == 0
            || self.in_flight >= opts.max_in_flight
        {
            return None;
        }
        let since = now.saturating_duration_since(self.last_sent?);
        self.timer_armed = true;
        Some(opts.rpc_spacing.saturating_sub(since))
    }
}

/// Once the spacing has passed, sends what is still queued in a new RPC
/// (if a slot is free and no newer RPC went out meanwhile; otherwise the
/// RPCs out will pick the calls up, or the timer is armed again).
async fn send_when_spaced<C: Calls>(inner: Arc<Inner>, namespace: String, mut delay: Duration) {
    let batch = loop {
        tokio::time::sleep(delay).await;
        let mut lanes = lock(C::lanes(&inner));
        let Some(lane) = lanes.get_mut(&namespace) else {
            return;
        };
        lane.timer_armed = false;
        let now = Instant::now();
        if let Some(batch) = lane.start_rpc(&inner.opts, now) {
            break batch;
        }
        match lane.arm_spacing_timer(&inner.opts, now) {
            Some(d) => delay = d,
            None => return,
        }
    };
    drive_lane(Slot::<C>::new(inner, namespace), batch).await;
}

/// A `next` call waiting for its share of an RPC.
struct Waiter {
    key: String,
    count: u32,
    /// When its caller's overall timeout ends.
    deadline: Instant,
    reply: oneshot::Sender<Result<NextResponse, ClientError>>,
}

/// A `next_ids` call waiting for its share of an RPC.
struct IdsWaiter {
    count: u32,
    /// When its caller's overall timeout ends.
    deadline: Instant,
    reply: oneshot::Sender<Result<NextIdsResponse, ClientError>>,
}

/// What the queue needs of a waiting call of either kind.
trait Queued {
    fn deadline(&self) -> Instant;
    /// Its caller stopped waiting (dropped the call's future).
    fn abandoned(&self) -> bool;
    fn fail(self, error: ClientError);
}

/// Both kinds of waiter keep a `deadline` and a `reply` sender alike.
macro_rules! queued_by_reply {
    ($($waiter:ty),*) => {$(
        impl Queued for $waiter {
            fn deadline(&self) -> Instant {
                self.deadline
            }

            fn abandoned(&self) -> bool {
                self.reply.is_closed()
            }

            fn fail(self, error: ClientError) {
                let _ = self.reply.send(Err(error));
            }
        }
    )*};
}

queued_by_reply!(Waiter, IdsWaiter);

/// Before an RPC takes the queue: calls whose callers gave up are dropped
/// unsent (sent, their numbers would be taken and never returned: in a
/// dense namespace a hole between two answered calls, and not a call that
/// failed in flight), and calls that waited past their deadline (every
/// slot busy retrying) fail, as their callers were promised.
fn prune<W: Queued>(queued: &mut Vec<W>, now: Instant) {
    if !queued.iter().any(|w| w.abandoned() || w.deadline() <= now) {
        return;
    }
    for w in std::mem::take(queued) {
        if w.abandoned() {
            continue;
        }
        if w.deadline() <= now {
            w.fail(ClientError::Exhausted {
                attempts: 0,
                last: Status::deadline_exceeded(
                    "waited in the client's queue until the overall timeout \
                     (every RPC slot was busy retrying)",
                ),
            });
            continue;
        }
        queued.push(w);
    }
}

/// `now + timeout`, or a century from now for a timeout past what an
/// `Instant` holds (`Duration::MAX` for "never give up").
fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(timeout.min(CENTURY)).unwrap_or(now)
}

/// How long batches to a node without `NextStream` go as RPCs before the
/// stream is tried again.
const NO_STREAM_RECHECK: Duration = Duration::from_secs(60);

/// How often at most the nodes are asked for their ids (a leader hint
/// naming an id this client has no endpoint for).
const LEARN_IDS_EVERY: Duration = Duration::from_secs(1);

/// Calls one coalesced RPC carries at most.
const MAX_COALESCED: usize = 512;

/// IDs one coalesced `NextIds` asks for at most (a call asking for more
/// goes alone): a millisecond's worth of the default layout, well under
/// the server's default `snowflake.max_count`. A server configured below
/// it refuses the sum, and the calls are then sent one by one.
const MAX_COALESCED_IDS: u64 = 4096;

impl Client {
    /// A client for the nodes at `endpoints` (`host:port`). Connections are
    /// made lazily.
    pub fn new(endpoints: &[impl AsRef<str>], opts: ClientOptions) -> Result<Self, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        if !opts.keepalive_interval.is_zero() && opts.keepalive_timeout.is_zero() {
            // Every connection PINGed would be dropped unless its answer
            // were already in.
            return Err(ClientError::BadOptions(
                "keepalive_timeout is zero while keepalive_interval is not",
            ));
        }
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_string()).collect();
        let nonce = client_nonce();
        let inner = Inner {
            endpoints: endpoints.clone(),
            channels: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            ids: Mutex::new(HashMap::new()),
            ids_asked: Mutex::new(None),
            opts,
            lanes: Mutex::new(HashMap::new()),
            ids_lanes: Mutex::new(HashMap::new()),
            // Clients of one frontend fleet spread their IDs calls over
            // the nodes.
            ids_node: AtomicUsize::new((nonce % endpoints.len() as u64) as usize),
            streams: StreamTable::default(),
            id_streams: StreamTable::default(),
            no_stream_recheck: NO_STREAM_RECHECK,
            request_ids: (nonce, std::sync::atomic::AtomicU64::new(0)),
        };
        for e in &endpoints {
            inner.channel(e)?;
        }
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// `count` consecutive numbers for `key`, coalesced with concurrent
    /// calls of the same namespace (see the module docs).
    pub async fn next(
        &self,
        namespace: &str,
        key: &str,
        count: u32,
    ) -> Result<NextResponse, ClientError> {
        // A count of 0 goes alone, for the server's error naming it: merged
        // into another call on the same key it would ride that call's range.
        let deadline = self.inner.deadline();
        if self.inner.opts.max_in_flight == 0 || count == 0 {
            let request_id = self.inner.request_id();
            return self
                .inner
                .next_one(namespace, key, count, &request_id, deadline)
                .await;
        }
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            key: key.to_string(),
            count,
            deadline,
            reply,
        };
        self.enqueue::<Seqs>(namespace, waiter);
        answered(answer).await
    }

    /// `count` Snowflake IDs, strictly increasing, all from one node (the
    /// response names its worker id), coalesced with concurrent calls
    /// (see the module docs).
    pub async fn next_ids(&self, count: u32) -> Result<NextIdsResponse, ClientError> {
        // A count of 0 goes alone, for the server's error naming it.
        let deadline = self.inner.deadline();
        if self.inner.opts.max_in_flight == 0 || count == 0 {
            return self.inner.call_ids(count, deadline).await;
        }
        let (reply, answer) = oneshot::channel();
        self.enqueue::<Ids>(
            "",
            IdsWaiter {
                count,
                deadline,
                reply,
            },
        );
        answered(answer).await
    }

    /// Queues `waiter` in lane `name`, and sends the lane's queue now or
    /// arms the spacing timer, as [`Lane::start_rpc`] decides.
    fn enqueue<C: Calls>(&self, name: &str, waiter: C::Waiter) {
        let (start, wake_in) = {
            let mut lanes = lock(C::lanes(&self.inner));
            // Looked up before inserting: the name is copied once per
            // lane, not once per call.
            if !lanes.contains_key(name) {
                lanes.insert(name.to_string(), Lane::default());
            }
            let lane = lanes.get_mut(name).expect("inserted above");
            lane.queued.push(waiter);
            let now = Instant::now();
            match lane.start_rpc(&self.inner.opts, now) {
                Some(batch) => (Some(batch), None),
                None => (None, lane.arm_spacing_timer(&self.inner.opts, now)),
            }
        };
        if let Some(delay) = wake_in {
            tokio::spawn(send_when_spaced::<C>(
                self.inner.clone(),
                name.to_string(),
                delay,
            ));
        }
        if let Some(batch) = start {
            // The slot is taken before any task exists: however what drives
            // it ends, dropping it gives the slot back (see `Slot`).
            let slot = Slot::<C>::new(self.inner.clone(), name.to_string());
            // A task of its own, so that this caller giving up cannot take
            // the answers of the callers riding with it.
            tokio::spawn(drive_lane(slot, batch));
        }
    }

    /// Like [`Client::next`], with an idempotency token; never coalesced
    /// (the server remembers a token per single-key call).
    pub async fn next_with_id(
        &self,
        namespace: &str,
        key: &str,
        count: u32,
        request_id: &str,
    ) -> Result<NextResponse, ClientError> {
        self.inner
            .next_one(namespace, key, count, request_id, self.inner.deadline())
            .await
    }

    /// Ranges for many keys of one namespace, all or nothing: one range
    /// per item, in `items`' order, each naming its key as given here and
    /// holding exactly the item's count (an answer that does not is the
    /// server's fault: [`ClientError::Rejected`] with `INTERNAL`).
    /// Sent as it is (never merged with other calls) on the node's
    /// `NextStream`, as coalesced calls are: a message on an open stream
    /// costs both sides less than an RPC of its own (with `max_in_flight`
    /// 0, a `NextBatch` RPC).
    pub async fn next_batch(
        &self,
        namespace: &str,
        items: &[(&str, u32)],
    ) -> Result<NextBatchResponse, ClientError> {
        self.inner
            .batch_answer(namespace, items)
            .await?
            .with_keys(items)
            .map_err(|status| ClientError::Rejected(*status))
    }

    /// [`Client::next_batch`] without the keys in its answer: range `i`
    /// is `items[i]`'s. Nothing is copied per key (the batch is encoded
    /// from `items` as they are), which saves a caller that keeps its keys
    /// an allocation and a free per key.
    pub async fn next_batch_ranges(
        &self,
        namespace: &str,
        items: &[(&str, u32)],
    ) -> Result<BatchRanges, ClientError> {
        self.inner
            .batch_answer(namespace, items)
            .await?
            .ranges_for(items)
            .map_err(|status| ClientError::Rejected(*status))
    }

    /// The highest number that may have been handed out for `key`.
    pub async fn current(&self, namespace: &str, key: &str) -> Result<u64, ClientError> {
        let req = CurrentRequest {
            namespace: namespace.to_string(),
            key: key.to_string(),
        };
        self.inner
            .call(|_, ch| {
                let req = req.clone();
                async move {
                    sequencer(ch)
                        .current(req)
                        .await
                        .map(|r| r.into_inner().current)
                }
            })
            .await
    }

    /// Status of the node at `addr` (no retries, no leader following).
    pub async fn node_status(&self, addr: &str) -> Result<StatusResponse, ClientError> {
        AdminClient::new(self.inner.channel(addr)?)
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(ClientError::Rejected)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A queued call's answer. It comes by the call's deadline: the RPC it
/// rides ends by the first of its calls' deadlines (every attempt, stream
/// or unary, is cut there: see [`within`]), and calls queued behind it are
/// due later (see `prune`).
async fn answered<T>(answer: oneshot::Receiver<Result<T, ClientError>>) -> Result<T, ClientError> {
    answer.await.unwrap_or_else(|_| {
        Err(ClientError::Rejected(Status::cancelled(
            "the client task carrying this call ended without an answer",
        )))
    })
}

/// `attempt` (a unary RPC, which the channel lets run the whole attempt
/// timeout), cut at the call's `deadline`.
async fn within<T>(
    deadline: Instant,
    attempt: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout_at(deadline.into(), attempt)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(
                "no reply before the call's overall timeout",
            ))
        })
}

/// Calls for one key riding the same RPC as one `NextBatch` item (a key
/// may appear once per batch): their counts are summed and the range split
/// among them in queue order. They were concurrent, so any order keeps I2.
/// The key is the item's; its waiters' own copies are left empty.
struct Item {
    key: String,
    count: u32,
    waiters: Vec<Waiter>,
}

/// Where a queued call goes in the batch being taken.
enum Place {
    /// Starts a new item.
    New,
    /// Joins item `usize`.
    Join(usize),
    /// Waits for the next batch.
    Later,
}

/// The queued calls the next RPC carries: every queued call, grouped by
/// key, at most [`MAX_COALESCED`] keys; the rest wait for the next RPC.
fn take_batch(queued: &mut Vec<Waiter>) -> Vec<Item> {
    // Grouped by borrowed keys first, so that no key is copied: each
    // item takes its first waiter's key.
    let mut places = Vec::with_capacity(queued.len());
    {
        let mut index: HashMap<&str, (usize, u32)> = HashMap::with_capacity(queued.len());
        for w in queued.iter() {
            let items = index.len();
            let place = match index.get_mut(w.key.as_str()) {
                Some((i, sum)) => match sum.checked_add(w.count) {
                    Some(total) => {
                        *sum = total;
                        Place::Join(*i)
                    }
                    None => Place::Later,
                },
                None if items < MAX_COALESCED => {
                    index.insert(&w.key, (items, w.count));
                    Place::New
                }
                None => Place::Later,
            };
            places.push(place);
        }
    }
    let mut items: Vec<Item> = Vec::new();
    let mut rest = Vec::new();
    for (mut w, place) in queued.drain(..).zip(places) {
        match place {
            Place::New => items.push(Item {
                key: std::mem::take(&mut w.key),
                count: w.count,
                waiters: vec![w],
            }),
            Place::Join(i) => {
                items[i].count += w.count;
                items[i].waiters.push(w);
            }
            Place::Later => rest.push(w),
        }
    }
    *queued = rest;
    items
}

/// The queued `next_ids` calls the next RPC carries: in queue order, while
/// their counts sum to at most [`MAX_COALESCED_IDS`] (the first always).
fn take_ids(queued: &mut Vec<IdsWaiter>) -> Vec<IdsWaiter> {
    let mut total = 0;
    let fit = queued
        .iter()
        .take_while(|w| {
            total += u64::from(w.count);
            total <= MAX_COALESCED_IDS
        })
        .count()
        .max(1);
    queued.drain(..fit.min(queued.len())).collect()
}

/// One of a lane's in-flight slots, held by the driver task that sends its
/// RPCs. It is given back by [`Slot::next_batch`] when nothing is left
/// queued, in the same critical section that sees the queue empty: given
/// back later, a call queued in between (while every slot looked busy)
/// could find no driver left and be failed unsent. A slot dropped without
/// that (its task cancelled, or unwinding) hands what is queued to a new
/// driver, or, with no runtime left to run one, fails those calls rather
/// than leave them waiting forever.
struct Slot<C: Calls> {
    inner: Arc<Inner>,
    namespace: String,
    released: bool,
    /// Counted in the lane's `gathering`.
    gathering: bool,
    calls: PhantomData<fn() -> C>,
}

impl<C: Calls> Slot<C> {
    /// A slot already counted in the lane's `in_flight`.
    fn new(inner: Arc<Inner>, namespace: String) -> Self {
        Self {
            inner,
            namespace,
            released: false,
            gathering: false,
            calls: PhantomData,
        }
    }

    /// Marks the lane as having a driver about to take the queue, so that
    /// calls made meanwhile wait for it rather than start RPCs of their own.
    fn gather(&mut self) {
        if let Some(lane) = lock(C::lanes(&self.inner)).get_mut(&self.namespace) {
            lane.gathering += 1;
            self.gathering = true;
        }
    }

    /// The next batch this slot should send, or `None` after giving the
    /// slot back because nothing is queued.
    fn next_batch(&mut self) -> Option<C::Batch> {
        let mut lanes = lock(C::lanes(&self.inner));
        let lane = lanes.get_mut(&self.namespace)?;
        if std::mem::take(&mut self.gathering) {
            lane.gathering -= 1;
        }
        if lane.queued.is_empty() {
            lane.in_flight -= 1;
            self.released = true;
            return None;
        }
        lane.last_sent = Some(Instant::now());
        Some(C::take(&mut lane.queued))
    }
}

impl<C: Calls> Drop for Slot<C> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut lanes = lock(C::lanes(&self.inner));
        let Some(lane) = lanes.get_mut(&self.namespace) else {
            return;
        };
        if self.gathering {
            lane.gathering -= 1;
        }
        if !lane.queued.is_empty() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let batch = C::take(&mut lane.queued);
                drop(lanes);
                let heir = Slot::<C>::new(self.inner.clone(), self.namespace.clone());
                rt.spawn(drive_lane(heir, batch));
                return;
            }
        }
        lane.in_flight -= 1;
        if lane.in_flight == 0 {
            for w in lane.queued.drain(..) {
                w.fail(ClientError::Rejected(Status::cancelled(
                    "the client task that was to send this call ended",
                )));
            }
        }
    }
}

/// Sends `batch`, then whatever queued meanwhile, until the lane is empty
/// and the slot given back.
async fn drive_lane<C: Calls>(mut slot: Slot<C>, mut batch: C::Batch) {
    loop {
        C::serve(&slot.inner, &slot.namespace, batch).await;
        // The callers just answered often call again at once. Letting them
        // run first puts their calls in this RPC's successor; deciding now
        // would send it with the one or two already queued, and the rest
        // would queue behind it for a whole round trip (or, the spacing
        // passed, start an RPC each).
        slot.gather();
        tokio::task::yield_now().await;
        match slot.next_batch() {
            Some(more) => batch = more,
            None => return,
        }
    }
}

impl Drop for Inner {
    /// Each stream's reply reader keeps it alive; closing them lets the
    /// nodes end them (after answering what they owe), and the readers
    /// and connections go with them.
    fn drop(&mut self) {
        self.streams.close_all();
        self.id_streams.close_all();
    }
}

impl Inner {
    /// A batch with a request id of its own, kept by every attempt: a
    /// retry (a timeout, a broken stream) gets the ranges the first attempt
    /// got if the same leader took it, rather than a second allocation, which
    /// in a dense namespace would leave a hole once both commit.
    fn batch_request(&self, namespace: &str, items: Vec<(String, u32)>) -> NextBatchRequest {
        NextBatchRequest {
            namespace: namespace.to_string(),
            items: items
                .into_iter()
                .map(|(key, count)| BatchItem { key, count })
                .collect(),
            request_id: self.request_id(),
        }
    }

    /// The deadline of a call starting now.
    fn deadline(&self) -> Instant {
        deadline_after(Instant::now(), self.opts.overall_timeout)
    }

    /// A request id of this client's own, for a call the caller gave none:
    /// its retries keep it, so a retry whose first attempt was served gets
    /// the same range (no second range, no hole in a dense namespace).
    fn request_id(&self) -> String {
        let (nonce, counter) = &self.request_ids;
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("seqd-client-{nonce:016x}-{n}")
    }
}

/// A `NextBatchRequest` encoded as prost encodes it (fields in tag order,
/// empty strings and zero counts left out), from borrowed keys: nothing is
/// copied per key but into the encoding.
fn encode_batch<'k>(
    namespace: &str,
    items: impl Iterator<Item = (&'k str, u32)> + Clone,
    request_id: &str,
) -> prost::bytes::Bytes {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    fn string_len(s: &str) -> usize {
        if s.is_empty() {
            0
        } else {
            1 + encoded_len_varint(s.len() as u64) + s.len()
        }
    }
    fn string(tag: u32, s: &str, buf: &mut Vec<u8>) {
        if !s.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(s.len() as u64, buf);
            buf.extend_from_slice(s.as_bytes());
        }
    }
    let item_len = |(key, count): (&str, u32)| {
        string_len(key)
            + if count == 0 {
                0
            } else {
                1 + encoded_len_varint(u64::from(count))
            }
    };
    let len = string_len(namespace)
        + string_len(request_id)
        + items
            .clone()
            .map(|item| {
                let n = item_len(item);
                1 + encoded_len_varint(n as u64) + n
            })
            .sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    string(1, namespace, &mut buf);
    for (key, count) in items {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(item_len((key, count)) as u64, &mut buf);
        string(1, key, &mut buf);
        if count != 0 {
            encode_key(2, WireType::Varint, &mut buf);
            encode_varint(u64::from(count), &mut buf);
        }
    }
    string(3, request_id, &mut buf);
    buf.into()
}

/// What one kind of call stream carries: `NextStream` for batches,
/// `NextIdsStream` for ID calls. Each message goes out with an id, which
/// its reply names.
trait StreamRpc: Sized + 'static {
    /// A call's request, as the unary RPC takes it.
    type Body: Clone + Send + 'static;
    /// A call's answer, as the unary RPC gives it.
    type Answer: Send + 'static;
    type Message: Send + 'static;
    type Reply: Send + 'static;
    /// Which stream, for errors.
    const NAME: &'static str;
    fn message(id: u64, body: Self::Body) -> Self::Message;
    /// The reply's id and its answer, or the error it carries.
    fn split(reply: Self::Reply) -> (u64, Result<Self::Answer, Status>);
    /// Starts the streaming RPC on `ch`, sending what `rx` yields.
    fn start(
        ch: Channel,
        rx: futures::channel::mpsc::UnboundedReceiver<Self::Message>,
    ) -> impl Future<Output = Result<tonic::Streaming<Self::Reply>, Status>> + Send;
    /// The call as its own RPC, for a node without the stream.
    fn unary(
        ch: Channel,
        body: Self::Body,
    ) -> impl Future<Output = Result<Self::Answer, Status>> + Send;
    /// The client's streams of this kind.
    fn table(inner: &Inner) -> &StreamTable<Self>;
}

/// A stream reply's answer: `ok`, or the status `error` carries.
fn reply_result<P: StreamRpc, T>(ok: Option<T>, error: Option<StreamError>) -> Result<T, Status> {
    match (ok, error) {
        (Some(ok), _) => Ok(ok),
        (None, Some(error)) => Err(Status::from(error)),
        (None, None) => Err(Status::internal(format!(
            "a reply on the {} with neither ok nor error",
            P::NAME
        ))),
    }
}

/// A `NextStreamReply` as this client reads it: the ranges without keys.
/// The client knows its keys (one range per item, in request order) and
/// asks for packed ranges, which name none; a node built before session
/// 35 answers with ranges that echo them, and prost would allocate, check
/// and copy a string per range only for the client to drop it: half of
/// the time a 50-range reply took to decode (3.6 against 1.7 µs, measured
/// with criterion in session 26). Wire-compatible with `NextStreamReply`:
/// prost passes over the field it does not name.
#[derive(Clone, PartialEq, prost::Message)]
struct StreamAnswer {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, optional, tag = "2")]
    ok: Option<BatchAnswer>,
    #[prost(message, optional, tag = "3")]
    error: Option<StreamError>,
}

/// `NextBatchResponse` without the echoed keys (see [`StreamAnswer`]).
/// The client asks for its ranges packed (`firsts`, `counts`); a node
/// built before session 35 answers with `ranges`, and
/// [`BatchAnswer::unpacked`] makes either `ranges`.
#[derive(Clone, PartialEq, prost::Message)]
struct BatchAnswer {
    #[prost(message, repeated, tag = "1")]
    ranges: Vec<RangeAnswer>,
    #[prost(uint64, tag = "2")]
    epoch: u64,
    #[prost(bool, tag = "3")]
    replayed: bool,
    #[prost(uint64, repeated, tag = "4")]
    firsts: Vec<u64>,
    #[prost(uint32, repeated, tag = "5")]
    counts: Vec<u32>,
}

/// What [`Client::next_batch_ranges`] answers: one range per item, in
/// the items' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRanges {
    pub ranges: Vec<BatchRange>,
    /// The leader's epoch, as [`NextBatchResponse::epoch`].
    pub epoch: u64,
    /// Repeated from the node's record of this batch's request id, as
    /// [`NextBatchResponse::replayed`].
    pub replayed: bool,
}

/// `count` numbers from `first` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRange {
    pub first: u64,
    pub count: u32,
}

/// `Range` without its key.
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct RangeAnswer {
    #[prost(uint64, tag = "2")]
    first: u64,
    #[prost(uint32, tag = "3")]
    count: u32,
}

impl From<&NextBatchResponse> for BatchAnswer {
    fn from(resp: &NextBatchResponse) -> Self {
        Self {
            ranges: resp
                .ranges
                .iter()
                .map(|r| RangeAnswer {
                    first: r.first,
                    count: r.count,
                })
                .collect(),
            epoch: resp.epoch,
            replayed: resp.replayed,
            firsts: Vec::new(),
            counts: Vec::new(),
        }
    }
}

impl BatchAnswer {
    /// An answer that does not give each item a range of the item's count,
    /// in the items' order, is refused as the server's error: a caller
    /// would otherwise stamp numbers it was not given, or leave some it was
    /// given unused.
    /// `counts` are the items', in order.
    fn check_fits(&self, counts: impl ExactSizeIterator<Item = u32>) -> Result<(), Box<Status>> {
        if self.ranges.len() != counts.len() {
            return Err(Box::new(Status::internal(format!(
                "NextBatch of {} keys answered with {} ranges",
                counts.len(),
                self.ranges.len()
            ))));
        }
        let misfit = self
            .ranges
            .iter()
            .zip(counts)
            .enumerate()
            .find(|(_, (r, count))| r.count != *count);
        match misfit {
            None => Ok(()),
            Some((i, (r, count))) => Err(Box::new(Status::internal(format!(
                "NextBatch item {i} asked for {count} numbers and was answered with {}",
                r.count
            )))),
        }
    }

    /// The answer's ranges for a batch of `items`.
    fn ranges_for(self, items: &[(&str, u32)]) -> Result<BatchRanges, Box<Status>> {
        self.check_fits(items.iter().map(|(_, count)| *count))?;
        Ok(BatchRanges {
            ranges: self
                .ranges
                .iter()
                .map(|r| BatchRange {
                    first: r.first,
                    count: r.count,
                })
                .collect(),
            epoch: self.epoch,
            replayed: self.replayed,
        })
    }

    /// The answer with packed ranges moved into `ranges`. Lists that do
    /// not pair up, or packed ranges beside others, leave no ranges, which
    /// fit no batch: refused as the server's error.
    fn unpacked(mut self) -> Self {
        if self.firsts.is_empty() && self.counts.is_empty() {
            return self;
        }
        let firsts = std::mem::take(&mut self.firsts);
        let counts = std::mem::take(&mut self.counts);
        self.ranges = if self.ranges.is_empty() && firsts.len() == counts.len() {
            firsts
                .into_iter()
                .zip(counts)
                .map(|(first, count)| RangeAnswer { first, count })
                .collect()
        } else {
            Vec::new()
        };
        self
    }

    /// The `NextBatchResponse` this answers `items` with, each range
    /// naming its item's key. An answer that does not fit the items (see
    /// [`BatchAnswer::check_fits`]) is refused as the server's error.
    fn with_keys(self, items: &[(&str, u32)]) -> Result<NextBatchResponse, Box<Status>> {
        self.check_fits(items.iter().map(|(_, count)| *count))?;
        Ok(NextBatchResponse {
            ranges: items
                .iter()
                .zip(self.ranges)
                .map(|((key, _), r)| crate::pb::Range {
                    key: key.to_string(),
                    first: r.first,
                    count: r.count,
                })
                .collect(),
            epoch: self.epoch,
            replayed: self.replayed,
            ..NextBatchResponse::default()
        })
    }
}

/// Coalesced `next` batches.
struct Batches;

impl StreamRpc for Batches {
    /// An encoded `NextBatchRequest`.
    type Body = prost::bytes::Bytes;
    type Answer = BatchAnswer;
    /// Its batch encoded once, before the first attempt: each attempt (and
    /// the unary fallback) shares the bytes instead of copying every key
    /// again.
    type Message = NextStreamRequest;
    type Reply = StreamAnswer;
    const NAME: &'static str = "batch stream";

    fn message(id: u64, batch: prost::bytes::Bytes) -> NextStreamRequest {
        NextStreamRequest {
            id,
            batch: Some(batch),
            // Read without keys (`StreamAnswer`).
            packed_ranges: true,
        }
    }

    fn split(reply: StreamAnswer) -> (u64, Result<BatchAnswer, Status>) {
        let answer = reply_result::<Self, _>(reply.ok, reply.error);
        (reply.id, answer.map(BatchAnswer::unpacked))
    }

    /// `SequencerClient::next_stream`, but reading each reply as a
    /// [`StreamAnswer`].
    async fn start(
        ch: Channel,
        rx: futures::channel::mpsc::UnboundedReceiver<NextStreamRequest>,
    ) -> Result<tonic::Streaming<StreamAnswer>, Status> {
        let mut grpc = tonic::client::Grpc::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("the batch stream's channel: {e}")))?;
        let mut req = tonic::IntoStreamingRequest::into_streaming_request(rx);
        req.extensions_mut()
            .insert(tonic::GrpcMethod::new("seqd.v1.Sequencer", "NextStream"));
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/seqd.v1.Sequencer/NextStream");
        let codec = crate::codec::Codec::<NextStreamRequest, StreamAnswer>::default();
        grpc.streaming(req, path, codec)
            .await
            .map(|r| r.into_inner())
    }

    async fn unary(ch: Channel, batch: prost::bytes::Bytes) -> Result<BatchAnswer, Status> {
        use prost::Message as _;
        // The bytes are this client's own encoding of the request (see
        // `encode_batch`): decoding them does not fail.
        let req = NextBatchRequest::decode(batch)
            .map_err(|e| Status::internal(format!("re-reading a batch to send: {e}")))?;
        let resp = sequencer(ch).next_batch(req).await?.into_inner();
        Ok(BatchAnswer::from(&resp))
    }

    fn table(inner: &Inner) -> &StreamTable<Self> {
        &inner.streams
    }
}

/// Coalesced `next_ids` calls.
struct IdCalls;

impl StreamRpc for IdCalls {
    type Body = NextIdsRequest;
    type Answer = NextIdsResponse;
    type Message = NextIdsStreamRequest;
    type Reply = NextIdsStreamReply;
    const NAME: &'static str = "ID stream";

    fn message(id: u64, request: NextIdsRequest) -> NextIdsStreamRequest {
        NextIdsStreamRequest {
            id,
            request: Some(request),
        }
    }

    fn split(reply: NextIdsStreamReply) -> (u64, Result<NextIdsResponse, Status>) {
        (reply.id, reply_result::<Self, _>(reply.ok, reply.error))
    }

    async fn start(
        ch: Channel,
        rx: futures::channel::mpsc::UnboundedReceiver<NextIdsStreamRequest>,
    ) -> Result<tonic::Streaming<NextIdsStreamReply>, Status> {
        ids(ch).next_ids_stream(rx).await.map(|r| r.into_inner())
    }

    async fn unary(ch: Channel, req: NextIdsRequest) -> Result<NextIdsResponse, Status> {
        ids(ch).next_ids(req).await.map(|r| r.into_inner())
    }

    fn table(inner: &Inner) -> &StreamTable<Self> {
        &inner.id_streams
    }
}

/// A client's streams of one kind, by endpoint, and the endpoints that
/// answered that stream with UNIMPLEMENTED (an older seqd), with when:
/// their calls go as unary RPCs for [`NO_STREAM_RECHECK`], then the stream
/// is tried again (the node may have been upgraded meanwhile).
struct StreamTable<P: StreamRpc> {
    open: Mutex<HashMap<String, Arc<CallStream<P>>>>,
    missing: Mutex<HashMap<String, Instant>>,
}

impl<P: StreamRpc> Default for StreamTable<P> {
    fn default() -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
        }
    }
}

impl<P: StreamRpc> StreamTable<P> {
    fn close_all(&self) {
        for stream in lock(&self.open).values() {
            stream.close();
        }
    }
}

/// A stream of calls to one node: each call goes out with an id, and its
/// reply, which may overtake replies to earlier calls, names it. Once
/// closed (the stream ended, or a caller gave up on a reply) it takes
/// nothing more; what it still owes is delivered if the node sends it,
/// and fails with the stream's status when the stream ends.
struct CallStream<P: StreamRpc> {
    state: Mutex<StreamState<P>>,
}

struct StreamState<P: StreamRpc> {
    /// Where calls go; `None` once the stream is closed.
    tx: Option<futures::channel::mpsc::UnboundedSender<P::Message>>,
    next_id: u64,
    /// Who waits for the reply to each call sent.
    waiting: HashMap<u64, oneshot::Sender<Result<P::Answer, Status>>>,
}

impl<P: StreamRpc> CallStream<P> {
    /// Starts the stream on `ch`: a task reads its replies until it ends.
    fn open(ch: Channel) -> Arc<Self> {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let stream = Arc::new(Self {
            state: Mutex::new(StreamState {
                tx: Some(tx),
                next_id: 0,
                waiting: HashMap::new(),
            }),
        });
        let reader = stream.clone();
        tokio::spawn(async move {
            let ended = match P::start(ch, rx).await {
                Ok(mut replies) => loop {
                    match replies.message().await {
                        Ok(Some(reply)) => reader.answer(reply),
                        Ok(None) => break Status::unavailable(format!("the {} ended", P::NAME)),
                        Err(status) => break status,
                    }
                },
                Err(status) => status,
            };
            reader.fail_all(ended);
        });
        stream
    }

    fn is_open(&self) -> bool {
        lock(&self.state).tx.is_some()
    }

    /// Sends `body`; `None` if the stream is closed.
    fn send(&self, body: P::Body) -> Option<oneshot::Receiver<Result<P::Answer, Status>>> {
        let mut state = lock(&self.state);
        let id = state.next_id;
        state
            .tx
            .as_ref()?
            .unbounded_send(P::message(id, body))
            .ok()?;
        state.next_id += 1;
        let (reply, answer) = oneshot::channel();
        state.waiting.insert(id, reply);
        Some(answer)
    }

    /// Takes no more calls. Replies to those already sent are still
    /// delivered while the server sends them; it ends the stream after the
    /// last.
    fn close(&self) {
        lock(&self.state).tx = None;
    }

    fn answer(&self, reply: P::Reply) {
        let (id, result) = P::split(reply);
        let Some(waiter) = lock(&self.state).waiting.remove(&id) else {
            return;
        };
        let _ = waiter.send(result);
    }

    /// The stream ended with `status`: every call still owed fails with it.
    /// A node answers for a call in its reply, so the stream's own status
    /// says only that the stream is gone (a node stopping sends GOAWAY,
    /// which tonic reports as INTERNAL): retryable, as UNAVAILABLE, except
    /// UNIMPLEMENTED, which tells an older node (see `Inner::on_stream`).
    fn fail_all(&self, status: Status) {
        let status = match status.code() {
            Code::Unimplemented | Code::Unavailable => status,
            _ => Status::unavailable(format!(
                "the {} broke: {}: {}",
                P::NAME,
                status.code(),
                status.message()
            )),
        };
        let mut state = lock(&self.state);
        state.tx = None;
        for (_, waiter) in state.waiting.drain() {
            let _ = waiter.send(Err(status.clone()));
        }
    }
}

/// A stream reply's `ok` and `error` for `result` (the reverse of
/// `reply_result`): the response, or the failure as the unary RPC would
/// have reported it.
fn reply_parts<T>(result: Result<T, Status>) -> (Option<T>, Option<StreamError>) {
    match result {
        Ok(resp) => (Some(resp), None),
        Err(status) => (None, Some(StreamError::from(&status))),
    }
}

impl NextStreamReply {
    /// The reply to batch `id` (see `reply_parts`).
    pub fn answering(id: u64, result: Result<NextBatchResponse, Status>) -> Self {
        let (ok, error) = reply_parts(result);
        Self { id, ok, error }
    }
}

impl NextIdsStreamReply {
    /// The reply to `NextIds` call `id` (see `reply_parts`).
    pub fn answering(id: u64, result: Result<NextIdsResponse, Status>) -> Self {
        let (ok, error) = reply_parts(result);
        Self { id, ok, error }
    }
}

impl From<&Status> for StreamError {
    /// A batch's failure as a stream reply carries it: code, message and
    /// the leader hints a follower adds.
    fn from(status: &Status) -> Self {
        let header = |name| {
            status
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        StreamError {
            code: status.code() as i32,
            message: status.message().to_string(),
            leader_addr: header(LEADER_ADDR_HEADER).unwrap_or_default(),
            leader_id: header(LEADER_ID_HEADER)
                .and_then(|id| id.parse().ok())
                .unwrap_or(0),
        }
    }
}

impl From<StreamError> for Status {
    /// Back to the status the `NextBatch` RPC would have failed with, so
    /// that retries and leader hints work the same over either.
    fn from(error: StreamError) -> Self {
        let mut status = Status::new(Code::from_i32(error.code), error.message);
        if !error.leader_addr.is_empty() {
            if let Ok(v) = tonic::metadata::MetadataValue::try_from(error.leader_addr.as_str()) {
                status.metadata_mut().insert(LEADER_ADDR_HEADER, v);
            }
        }
        if error.leader_id != 0 {
            status.metadata_mut().insert(
                LEADER_ID_HEADER,
                tonic::metadata::MetadataValue::from(error.leader_id),
            );
        }
        status
    }
}

impl Inner {
    /// Sends `batch` on the stream (a single call too: a batch on an open
    /// stream costs both sides less than a `Next` RPC); every waiter
    /// answered.
    async fn serve_batch(&self, namespace: &str, mut batch: Vec<Item>) {
        let mut keys_refused = 0;
        loop {
            // Its calls share the retries, until the first of them is due.
            let Some(deadline) = batch
                .iter()
                .flat_map(|i| &i.waiters)
                .map(|w| w.deadline)
                .min()
            else {
                return;
            };
            let items = batch
                .iter_mut()
                .map(|i| (std::mem::take(&mut i.key), i.count))
                .collect();
            let (result, keys) = self.stream_batch(namespace, items, deadline).await;
            for (item, key) in batch.iter_mut().zip(keys) {
                item.key = key;
            }
            let status = match result {
                Err(ClientError::Rejected(status)) if !refuses_every_call(&status) => status,
                other => return answer_batch(batch, other),
            };
            // The server refused the batch as a whole, and allocated
            // nothing. An item whose key it refused: each of its calls
            // would be refused the same alone, and is answered so, naming
            // its own field (`key`, not the batch's `items[i].key`); the
            // rest go again as one batch.
            // The server names the first bad item only: past a few, the
            // rest go call by call (at once) rather than a round trip each.
            let refused = refused_key(&status).filter(|(i, _)| *i < batch.len());
            if let (Some((index, refusal)), true) = (refused, keys_refused < MAX_KEYS_REFUSED) {
                keys_refused += 1;
                let refused = batch.remove(index);
                let status = Status::invalid_argument(refusal);
                for w in refused.waiters {
                    let _ = w.reply.send(Err(ClientError::Rejected(status.clone())));
                }
                // The batch sent again is a new RPC: calls given up on, or
                // past their deadline, meanwhile leave it (see `prune`).
                prune_items(&mut batch, Instant::now());
                continue;
            }
            // Any other (a summed count over the namespace's limit): each
            // call is asked for on its own, so only a bad one fails, with
            // the fields of its own call.
            let singles = batch
                .into_iter()
                .flat_map(|i| {
                    let key = i.key;
                    i.waiters.into_iter().map(move |w| (key.clone(), w))
                })
                .filter(|(_, w)| !w.abandoned())
                .map(|(key, w)| async move {
                    let request_id = self.request_id();
                    let result = self
                        .next_one(namespace, &key, w.count, &request_id, w.deadline)
                        .await;
                    let _ = w.reply.send(result);
                });
            futures::future::join_all(singles).await;
            return;
        }
    }

    async fn next_one(
        &self,
        namespace: &str,
        key: &str,
        count: u32,
        request_id: &str,
        deadline: Instant,
    ) -> Result<NextResponse, ClientError> {
        let req = NextRequest {
            namespace: namespace.to_string(),
            key: key.to_string(),
            count,
            request_id: request_id.to_string(),
        };
        let resp = self
            .call_until(deadline, |_, ch| {
                let req = req.clone();
                within(deadline, async move {
                    sequencer(ch).next(req).await.map(|r| r.into_inner())
                })
            })
            .await?;
        // As a batch's ranges are checked (`BatchAnswer::check_fits`).
        if resp.count != count {
            return Err(ClientError::Rejected(Status::internal(format!(
                "Next asked for {count} numbers and was answered with {}",
                resp.count
            ))));
        }
        Ok(resp)
    }

    async fn next_batch(
        &self,
        namespace: &str,
        items: Vec<(String, u32)>,
    ) -> Result<NextBatchResponse, ClientError> {
        let req = self.batch_request(namespace, items);
        self.call(|_, ch| {
            let req = req.clone();
            async move { sequencer(ch).next_batch(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// [`Inner::next_batch`] over the leader's `NextStream` (the RPC itself
    /// for a node without one), with the same retries; gives the keys back
    /// (in order) for a retry call by call.
    async fn stream_batch(
        &self,
        namespace: &str,
        items: Vec<(String, u32)>,
        deadline: Instant,
    ) -> (Result<BatchAnswer, ClientError>, Vec<String>) {
        let body = encode_batch(
            namespace,
            items.iter().map(|(k, c)| (k.as_str(), *c)),
            &self.request_id(),
        );
        let result = self.stream_batch_bytes(body, deadline).await;
        (result, items.into_iter().map(|(key, _)| key).collect())
    }

    /// The answer to a batch whose caller keeps its keys: over the
    /// leader's `NextStream` (see [`Inner::stream_batch`]), or with
    /// `max_in_flight` 0 as a `NextBatch` RPC; not yet checked against
    /// the items.
    async fn batch_answer(
        &self,
        namespace: &str,
        items: &[(&str, u32)],
    ) -> Result<BatchAnswer, ClientError> {
        if self.opts.max_in_flight == 0 {
            let owned = items.iter().map(|(k, c)| (k.to_string(), *c)).collect();
            return Ok(BatchAnswer::from(&self.next_batch(namespace, owned).await?));
        }
        let body = encode_batch(namespace, items.iter().copied(), &self.request_id());
        self.stream_batch_bytes(body, self.deadline()).await
    }

    /// An encoded `NextBatchRequest` over the leader's `NextStream`, every
    /// attempt sending the same bytes.
    async fn stream_batch_bytes(
        &self,
        body: prost::bytes::Bytes,
        deadline: Instant,
    ) -> Result<BatchAnswer, ClientError> {
        self.call_until(deadline, |target, ch| {
            let body = &body;
            async move { self.on_stream::<Batches>(&target, ch, body, deadline).await }
        })
        .await
    }

    /// One attempt: `body` on `target`'s stream of kind `P`, opened if it
    /// has none or the last one broke; as its own RPC if the node has no
    /// such stream. It waits for the reply for the attempt timeout, or
    /// until the call's `deadline` if that comes first.
    async fn on_stream<P: StreamRpc>(
        &self,
        target: &str,
        ch: Channel,
        body: &P::Body,
        deadline: Instant,
    ) -> Result<P::Answer, Status> {
        let table = P::table(self);
        let without_stream = lock(&table.missing)
            .get(target)
            .is_some_and(|since| since.elapsed() < self.no_stream_recheck);
        if without_stream {
            return within(deadline, P::unary(ch, body.clone())).await;
        }
        let stream = {
            let mut streams = lock(&table.open);
            match streams.get(target) {
                Some(s) if s.is_open() => s.clone(),
                _ => {
                    let s = CallStream::<P>::open(ch.clone());
                    streams.insert(target.to_string(), s.clone());
                    s
                }
            }
        };
        let Some(answer) = stream.send(body.clone()) else {
            return Err(Status::unavailable(format!(
                "the {} to this node broke",
                P::NAME
            )));
        };
        let attempt_ends = deadline_after(Instant::now(), self.opts.attempt_timeout);
        let result = match tokio::time::timeout_at(attempt_ends.min(deadline).into(), answer).await
        {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the {} to this node ended",
                P::NAME
            ))),
            Err(_) => {
                // A stream that lets a reply wait this long may never send
                // it (a node that stopped answering), and whoever waited
                // for it would stay in its table as long as it lives: the
                // next call opens a new stream, and this one ends once the
                // node answers what it still owes (the calls already on it
                // still get their replies), or its connection dies. Also
                // when the call's own deadline came first: with an overall
                // timeout under the attempt timeout, that is every time.
                stream.close();
                let waited = if deadline < attempt_ends {
                    "before the call's overall timeout"
                } else {
                    "within the attempt timeout"
                };
                Err(Status::deadline_exceeded(format!(
                    "no reply on the {} {waited}",
                    P::NAME
                )))
            }
        };
        match result {
            Err(status) if status.code() == Code::Unimplemented => {
                lock(&table.missing).insert(target.to_string(), Instant::now());
                within(deadline, P::unary(ch, body.clone())).await
            }
            other => other,
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| ClientError::BadEndpoint(addr.to_string()))?
            .connect_timeout(Duration::from_millis(500))
            .timeout(self.opts.attempt_timeout)
            .tcp_nodelay(true);
        if !self.opts.keepalive_interval.is_zero() {
            endpoint = endpoint
                .http2_keep_alive_interval(self.opts.keepalive_interval)
                .keep_alive_timeout(self.opts.keepalive_timeout)
                .keep_alive_while_idle(false);
        }
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn leader_guess(&self) -> Option<String> {
        self.leader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_leader(&self, addr: Option<String>) {
        *self
            .leader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = addr;
    }

    /// Runs `f` against the leader (given its address and channel),
    /// following hints and retrying, for the overall timeout.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(String, Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.call_until(self.deadline(), f).await
    }

    /// [`Inner::call`] until `deadline`.
    async fn call_until<T, F, Fut>(&self, deadline: Instant, f: F) -> Result<T, ClientError>
    where
        F: Fn(String, Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut retry = Retry::until(deadline, &self.opts);
        let mut rotate = 0usize;
        // Hints this call followed at once: two nodes that name each other
        // (each still believing the other leads, during an election) are
        // tried again only after the backoff, not in a tight loop.
        let mut hints_followed: Vec<String> = Vec::new();
        loop {
            let target = self
                .leader_guess()
                .unwrap_or_else(|| self.endpoints[rotate % self.endpoints.len()].clone());
            retry.attempts += 1;
            let status = match f(target.clone(), self.channel(&target)?).await {
                Ok(v) => {
                    self.set_leader(Some(target));
                    return Ok(v);
                }
                Err(status) => status,
            };
            if !retryable(&status) {
                return Err(ClientError::Rejected(status));
            }
            // Out of time: this call ends here, and what it saw of a node
            // too slow for its deadline moves no other call's leader guess.
            retry.give_up_if_due(&status)?;
            let hint = self.follow_hint(&status, &target).await;
            let fresh_hint = match &hint {
                Some(h) if !hints_followed.contains(h) => {
                    hints_followed.push(h.clone());
                    true
                }
                _ => false,
            };
            if hint.is_none() {
                rotate += 1;
            }
            self.set_leader(hint);
            // A fresh hint is worth trying at once; anything else waits.
            retry.after(status, !fresh_hint).await?;
        }
    }

    /// `count` IDs from the node this client asks for IDs; on to the next
    /// endpoint when it cannot issue (down, no worker id yet, its time
    /// fence reached) or refuses (its clock stepped back too far, demand
    /// over its capacity). Refusals end the call once every node has
    /// refused.
    async fn call_ids(
        &self,
        count: u32,
        deadline: Instant,
    ) -> Result<NextIdsResponse, ClientError> {
        let nodes = self.endpoints.len();
        let mut retry = Retry::until(deadline, &self.opts);
        let mut refused = 0;
        loop {
            let at = self.ids_node.load(Ordering::Relaxed);
            let target = &self.endpoints[at % nodes];
            retry.attempts += 1;
            let ch = self.channel(target)?;
            let req = NextIdsRequest { count };
            let result = if self.opts.max_in_flight == 0 {
                within(deadline, IdCalls::unary(ch, req)).await
            } else {
                self.on_stream::<IdCalls>(target, ch, &req, deadline).await
            };
            let status = match result {
                Ok(resp) => return Ok(resp),
                Err(status) => status,
            };
            if matches!(
                status.code(),
                Code::FailedPrecondition | Code::ResourceExhausted
            ) {
                refused += 1;
                if refused >= nodes {
                    return Err(ClientError::Rejected(status));
                }
            } else if !retryable(&status) {
                return Err(ClientError::Rejected(status));
            }
            retry.give_up_if_due(&status)?;
            // Calls failing together at one node move the client on once,
            // not once each.
            let _ = self.ids_node.compare_exchange(
                at,
                at.wrapping_add(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            // Another node is worth trying at once; a pause only after
            // every node has failed in turn.
            let round_done = retry.attempts as usize % nodes == 0;
            retry.after(status, round_done).await?;
        }
    }

    /// Sends one `NextIds` for the calls of `batch` together and gives
    /// each its slice, in queue order.
    async fn serve_ids(&self, batch: Vec<IdsWaiter>) {
        // Its calls share the retries, until the first of them is due.
        let Some(deadline) = batch.iter().map(|w| w.deadline).min() else {
            return;
        };
        let total: u32 = batch.iter().map(|w| w.count).sum();
        match self.call_ids(total, deadline).await {
            Ok(resp) if resp.ids.len() == total as usize => {
                let mut ids = resp.ids.into_iter();
                for w in batch {
                    let _ = w.reply.send(Ok(NextIdsResponse {
                        ids: ids.by_ref().take(w.count as usize).collect(),
                        worker: resp.worker,
                    }));
                }
            }
            Ok(resp) => {
                let status = Status::internal(format!(
                    "NextIds for {total} answered with {} ids",
                    resp.ids.len()
                ));
                for w in batch {
                    let _ = w.reply.send(Err(ClientError::Rejected(status.clone())));
                }
            }
            // The sum refused as bad input (over a node's lower
            // `max_count`): each call on its own, so only one over the
            // limit fails. (Any other refusal would refuse each alone too.)
            Err(ClientError::Rejected(s))
                if batch.len() > 1 && s.code() == Code::InvalidArgument =>
            {
                let singles = batch
                    .into_iter()
                    .filter(|w| !w.abandoned())
                    .map(|w| async move {
                        let _ = w.reply.send(self.call_ids(w.count, w.deadline).await);
                    });
                futures::future::join_all(singles).await;
            }
            Err(e) => {
                for w in batch {
                    let _ = w.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// The endpoint a leader hint points to, if this client can reach it.
    async fn follow_hint(&self, status: &Status, target: &str) -> Option<String> {
        // A node that does not know the leader's address still names its
        // id (the address is then empty).
        let addr = status
            .metadata()
            .get(LEADER_ADDR_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|a| self.endpoints.iter().any(|e| e == a));
        let hinted = if let Some(addr) = addr {
            Some(addr.to_string())
        } else {
            let id: u64 = status
                .metadata()
                .get(LEADER_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())?;
            if !self.lock_ids().contains_key(&id) {
                self.learn_ids().await;
            }
            self.lock_ids().get(&id).cloned()
        };
        hinted.filter(|a| a != target)
    }

    fn lock_ids(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        self.ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks every endpoint for its node id, all at once, for at most
    /// 300 ms; at most once a second: a leader this client cannot reach
    /// (not among its endpoints) would otherwise send every node a
    /// `Status` RPC for every attempt of every call.
    async fn learn_ids(&self) {
        {
            let mut asked = lock(&self.ids_asked);
            if asked.is_some_and(|t| t.elapsed() < LEARN_IDS_EVERY) {
                return;
            }
            *asked = Some(Instant::now());
        }
        let asks = self.endpoints.iter().map(|e| async move {
            let ch = self.channel(e).ok()?;
            let mut admin = AdminClient::new(ch);
            let r =
                tokio::time::timeout(Duration::from_millis(300), admin.status(StatusRequest {}))
                    .await
                    .ok()?
                    .ok()?;
            Some((r.into_inner().id, e.clone()))
        });
        let learned = futures::future::join_all(asks).await;
        self.lock_ids().extend(learned.into_iter().flatten());
    }
}

/// The attempts of one call, until the overall deadline.
struct Retry {
    deadline: Instant,
    backoff: Duration,
    backoff_max: Duration,
    attempts: u32,
}

impl Retry {
    fn until(deadline: Instant, opts: &ClientOptions) -> Self {
        Self {
            deadline,
            backoff: opts.backoff_min,
            backoff_max: opts.backoff_max,
            attempts: 0,
        }
    }

    /// Gives up, with `last`, if the deadline has passed.
    fn give_up_if_due(&self, last: &Status) -> Result<(), ClientError> {
        if Instant::now() >= self.deadline {
            return Err(ClientError::Exhausted {
                attempts: self.attempts,
                last: last.clone(),
            });
        }
        Ok(())
    }

    /// After a failed attempt (`last`): gives up once the deadline has
    /// passed; otherwise, if `pause`, waits the backoff (doubled for next
    /// time) before the next attempt, and gives up if that reached the
    /// deadline (an attempt started then would run past it).
    async fn after(&mut self, last: Status, pause: bool) -> Result<(), ClientError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() && pause {
            tokio::time::sleep(self.backoff.min(left)).await;
            self.backoff = self.backoff.saturating_mul(2).min(self.backoff_max);
        }
        self.give_up_if_due(&last)
    }
}

/// Answers every call of `batch` from its outcome: each its share of the
/// ranges; or, a refusal of the namespace or any other failure, the error
/// (a refusal of the namespace is every call's: each alone would get it).
fn answer_batch(batch: Vec<Item>, outcome: Result<BatchAnswer, ClientError>) {
    let error = match outcome {
        Ok(resp) => match resp.check_fits(batch.iter().map(|i| i.count)) {
            Ok(()) => {
                for (item, r) in batch.into_iter().zip(resp.ranges) {
                    let mut first = r.first;
                    for w in item.waiters {
                        let _ = w.reply.send(Ok(NextResponse {
                            first,
                            count: w.count,
                            epoch: resp.epoch,
                            replayed: resp.replayed,
                        }));
                        first += u64::from(w.count);
                    }
                }
                return;
            }
            // Every call in it fails: asking for each again would spend
            // the numbers the batch was granted.
            Err(status) => ClientError::Rejected(*status),
        },
        Err(e) => e,
    };
    for w in batch.into_iter().flat_map(|i| i.waiters) {
        let _ = w.reply.send(Err(error.clone()));
    }
}

/// Keys refused one at a time in one batch before its calls go call by
/// call.
const MAX_KEYS_REFUSED: usize = 3;

/// The item a batch's refusal names by its key (`items[i].key: ...`), and
/// the refusal as that item's call alone would get it (`key: ...`). A key
/// named twice in one batch is no single call's refusal (this client never
/// sends one twice; if it did, the calls go one by one).
fn refused_key(status: &Status) -> Option<(usize, String)> {
    if status.code() != Code::InvalidArgument {
        return None;
    }
    let (index, field) = status.message().strip_prefix("items[")?.split_once("].")?;
    if !field.starts_with("key:") || field.ends_with("appears more than once") {
        return None;
    }
    Some((index.parse().ok()?, field.to_string()))
}

/// [`prune`] for a batch about to be sent again: its calls given up on
/// leave their items (an item's count shrinks with them, and an item left
/// with none goes), and those past their deadline fail.
fn prune_items(batch: &mut Vec<Item>, now: Instant) {
    for item in batch.iter_mut() {
        prune(&mut item.waiters, now);
        item.count = item.waiters.iter().map(|w| w.count).sum();
    }
    batch.retain(|item| !item.waiters.is_empty());
}

/// Whether a refused batch's error is every call's in it: the server
/// names the field it refuses, and a refusal of the namespace (unknown, or
/// empty) does not depend on the call; one that names an item does.
fn refuses_every_call(status: &Status) -> bool {
    status.code() == Code::InvalidArgument && status.message().starts_with("namespace:")
}

/// Errors a retry (possibly on another node) can fix. INTERNAL only when
/// tonic made it from an HTTP/2 error (a stream reset, or a GOAWAY from a
/// node that stops, with NO_ERROR or INTERNAL_ERROR): the call got no
/// answer at all. An INTERNAL that a node sent as its answer is not retried.
fn retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => true,
        Code::Internal => from_http2(status),
        _ => false,
    }
}

/// Whether an HTTP/2 error is among `status`'s sources.
fn from_http2(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<h2::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::NextStreamRequest;

    /// A queued call whose caller waits for the rest of the test (its
    /// receiver is leaked), due in an hour.
    fn waiter(key: &str, count: u32) -> Waiter {
        let (waiter, answer) = waiter_due(key, count, Instant::now() + Duration::from_secs(3600));
        std::mem::forget(answer);
        waiter
    }

    /// A queued call for `key`, due at `deadline`, and its caller's end.
    fn waiter_due(
        key: &str,
        count: u32,
        deadline: Instant,
    ) -> (Waiter, oneshot::Receiver<Result<NextResponse, ClientError>>) {
        let (reply, answer) = oneshot::channel();
        let waiter = Waiter {
            key: key.to_string(),
            count,
            deadline,
            reply,
        };
        (waiter, answer)
    }

    /// A client whose only node does not exist, giving up quickly, with
    /// one call queued in `ns` and one slot in flight.
    fn client_with_a_queued_call() -> (Client, oneshot::Receiver<Result<NextResponse, ClientError>>)
    {
        let opts = ClientOptions {
            overall_timeout: Duration::from_millis(200),
            attempt_timeout: Duration::from_millis(50),
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            max_in_flight: 1,
            rpc_spacing: Duration::ZERO,
            rpc_fill: 0,
            ..ClientOptions::default()
        };
        let client = Client::new(&["127.0.0.1:1"], opts).unwrap();
        let (reply, answer) = oneshot::channel();
        let mut lanes = lock(&client.inner.lanes);
        let lane = lanes.entry("ns".into()).or_default();
        lane.in_flight = 1;
        lane.queued.push(Waiter {
            key: "k".into(),
            count: 1,
            deadline: client.inner.deadline(),
            reply,
        });
        drop(lanes);
        (client, answer)
    }

    fn slot(client: &Client) -> Slot<Seqs> {
        Slot::new(client.inner.clone(), "ns".into())
    }

    fn in_flight(client: &Client) -> usize {
        lock(&client.inner.lanes)["ns"].in_flight
    }

    /// Queues a call for a key of its own.
    fn queue_one(lane: &mut Lane<Seqs>) {
        let key = format!("k{}", lane.queued.len());
        lane.queued.push(waiter(&key, 1));
    }

    #[test]
    fn enough_queued_calls_go_without_waiting_for_the_spacing() {
        let opts = ClientOptions {
            max_in_flight: 2,
            rpc_spacing: Duration::from_millis(1),
            rpc_fill: 3,
            ..ClientOptions::default()
        };
        let t0 = Instant::now();
        let mut lane = Lane::default();
        queue_one(&mut lane);
        assert!(lane.start_rpc(&opts, t0).is_some(), "idle: at once");
        let soon = t0 + opts.rpc_spacing / 4;
        queue_one(&mut lane);
        queue_one(&mut lane);
        assert!(
            lane.start_rpc(&opts, soon).is_none(),
            "two wait for the spacing"
        );
        queue_one(&mut lane);
        let batch = lane.start_rpc(&opts, soon).expect("three fill an RPC");
        assert_eq!(batch.len(), 3);
        assert_eq!(lane.in_flight, 2);
        for _ in 0..3 {
            queue_one(&mut lane);
        }
        assert!(lane.start_rpc(&opts, soon).is_none(), "every slot taken");
        lane.in_flight = 1;
        lane.gathering = 1;
        assert!(
            lane.start_rpc(&opts, soon).is_none(),
            "a driver about to take the queue takes them"
        );
    }

    #[test]
    fn a_second_rpc_waits_for_the_spacing() {
        let opts = ClientOptions {
            max_in_flight: 2,
            rpc_spacing: Duration::from_millis(1),
            ..ClientOptions::default()
        };
        let t0 = Instant::now();
        let mut lane = Lane::default();
        queue_one(&mut lane);
        assert_eq!(
            lane.start_rpc(&opts, t0).map(|b| b.len()),
            Some(1),
            "idle: at once"
        );
        queue_one(&mut lane);
        let soon = t0 + opts.rpc_spacing / 4;
        assert!(lane.start_rpc(&opts, soon).is_none(), "too soon");
        assert_eq!(
            lane.arm_spacing_timer(&opts, soon),
            Some(opts.rpc_spacing * 3 / 4),
            "the queued call goes when the spacing has passed"
        );
        assert_eq!(lane.arm_spacing_timer(&opts, soon), None, "armed once");
        lane.timer_armed = false;
        queue_one(&mut lane);
        let batch = lane
            .start_rpc(&opts, t0 + opts.rpc_spacing)
            .expect("spaced");
        assert_eq!(batch.len(), 2, "carries both queued calls");
        assert_eq!(lane.in_flight, 2);
        queue_one(&mut lane);
        assert!(
            lane.start_rpc(&opts, t0 + 10 * opts.rpc_spacing).is_none(),
            "every slot taken"
        );
        assert_eq!(
            lane.arm_spacing_timer(&opts, t0 + 10 * opts.rpc_spacing),
            None,
            "no timer: answers will pick the call up"
        );
        assert!(
            Lane::<Seqs>::default().start_rpc(&opts, t0).is_none(),
            "nothing queued, no RPC"
        );
        // Zero spacing: a new RPC whenever a slot is free.
        let zero = ClientOptions {
            rpc_spacing: Duration::ZERO,
            ..opts
        };
        let mut lane = Lane::default();
        queue_one(&mut lane);
        assert!(lane.start_rpc(&zero, t0).is_some());
        queue_one(&mut lane);
        assert!(lane.start_rpc(&zero, t0).is_some());
        // A driver about to take the queue: new calls ride its RPC, start
        // none of their own and arm no timer, whatever the spacing says.
        let mut lane = Lane {
            in_flight: 1,
            gathering: 1,
            ..Lane::default()
        };
        queue_one(&mut lane);
        assert!(lane.start_rpc(&zero, t0).is_none());
        assert_eq!(lane.arm_spacing_timer(&opts, t0 + opts.rpc_spacing), None);
    }

    #[tokio::test]
    async fn a_slot_is_given_back_only_when_nothing_is_queued() {
        let (client, _answer) = client_with_a_queued_call();
        let mut s = slot(&client);
        let batch = s.next_batch().expect("the queued call");
        assert_eq!(batch.len(), 1);
        assert_eq!(in_flight(&client), 1, "still held while it has work");
        assert!(s.next_batch().is_none());
        assert_eq!(in_flight(&client), 0);
        drop(s);
        assert_eq!(in_flight(&client), 0, "given back once, not twice");
    }

    #[tokio::test]
    async fn a_slot_dropped_with_calls_queued_hands_them_to_a_new_driver() {
        let (client, answer) = client_with_a_queued_call();
        drop(slot(&client));
        // The heir sends the call: it fails for want of a server, after its
        // retries, rather than being cancelled unsent.
        match answer.await.expect("answered") {
            Err(ClientError::Exhausted { .. }) => {}
            other => panic!("expected the heir's failed attempts, got {other:?}"),
        }
        // The heir gives the slot back after it answered: wait for that.
        let deadline = Instant::now() + Duration::from_secs(5);
        while in_flight(&client) != 0 {
            assert!(Instant::now() < deadline, "the heir kept its slot");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn a_slot_dropped_without_a_runtime_fails_queued_calls() {
        // Made in a runtime (the client's channels need one), dropped
        // outside it, as when a runtime has shut down under a driver.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (client, mut answer) = rt.block_on(async { client_with_a_queued_call() });
        drop(slot(&client));
        let got = answer.try_recv().expect("answered at once");
        assert!(
            matches!(&got, Err(ClientError::Rejected(s)) if s.code() == Code::Cancelled),
            "{got:?}"
        );
        assert_eq!(in_flight(&client), 0);
    }

    /// A `Sequencer` that answers every call and records how many calls
    /// each RPC carried.
    #[cfg(feature = "server")]
    #[derive(Clone, Default)]
    struct CountingServer {
        calls_per_rpc: Arc<Mutex<Vec<usize>>>,
        /// Serve `NextStream` (off: answer it UNIMPLEMENTED, as a seqd
        /// from before it).
        stream: Arc<std::sync::atomic::AtomicBool>,
        /// `NextStream` calls, served or not.
        streams_asked: Arc<std::sync::atomic::AtomicUsize>,
        /// Batches answered on a stream.
        stream_batches: Arc<std::sync::atomic::AtomicUsize>,
        /// This many `Next` calls to come end without an answer: the
        /// handler panics, and the server resets the call's HTTP/2 stream.
        resets: Arc<std::sync::atomic::AtomicUsize>,
        /// Answer `Next` UNAVAILABLE, naming this address as the leader.
        redirect: Arc<Mutex<Option<String>>>,
        /// Each batch on a stream waits for a permit, if set.
        gate: Option<Arc<tokio::sync::Semaphore>>,
        /// The keys of the batches that came on streams, in order.
        stream_keys: Arc<Mutex<Vec<String>>>,
    }

    #[cfg(feature = "server")]
    impl CountingServer {
        /// One that serves `NextStream`, as a current seqd does.
        fn streaming() -> Self {
            let server = Self::default();
            server
                .stream
                .store(true, std::sync::atomic::Ordering::SeqCst);
            server
        }
    }

    /// Every item answered from 1 (the client only checks the counts); a
    /// batch with a key named `replayed...` as a repeat of its record; a
    /// key named `misfit...` with one number more than it asked for, as a
    /// faulty server would.
    #[cfg(feature = "server")]
    fn answer_from_one(items: Vec<BatchItem>) -> NextBatchResponse {
        let replayed = items.iter().any(|i| i.key.starts_with("replayed"));
        let ranges = items
            .into_iter()
            .map(|i| crate::pb::Range {
                count: i.count + u32::from(i.key.starts_with("misfit")),
                key: i.key,
                first: 1,
            })
            .collect();
        NextBatchResponse {
            ranges,
            epoch: 1,
            replayed,
            ..NextBatchResponse::default()
        }
    }

    #[cfg(feature = "server")]
    #[tonic::async_trait]
    impl crate::pb::sequencer_server::Sequencer for CountingServer {
        async fn next(
            &self,
            request: tonic::Request<NextRequest>,
        ) -> Result<tonic::Response<NextResponse>, Status> {
            lock(&self.calls_per_rpc).push(1);
            if let Some(leader) = lock(&self.redirect).clone() {
                let mut status = Status::unavailable("not the leader");
                status
                    .metadata_mut()
                    .insert(LEADER_ADDR_HEADER, leader.parse().expect("an address"));
                return Err(status);
            }
            let reset = self
                .resets
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok();
            assert!(!reset, "a handler that fails without answering");
            let req = request.into_inner();
            if req.key.starts_with("bad") {
                return Err(Status::invalid_argument("key: bad"));
            }
            Ok(tonic::Response::new(NextResponse {
                first: 1,
                count: req.count + u32::from(req.key.starts_with("misfit")),
                epoch: 1,
                replayed: false,
            }))
        }

        async fn next_batch(
            &self,
            request: tonic::Request<NextBatchRequest>,
        ) -> Result<tonic::Response<NextBatchResponse>, Status> {
            let items = request.into_inner().items;
            let calls = items.iter().map(|i| i.count as usize).sum();
            lock(&self.calls_per_rpc).push(calls);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("never closed").forget();
            }
            Ok(tonic::Response::new(answer_from_one(items)))
        }

        async fn current(
            &self,
            _: tonic::Request<CurrentRequest>,
        ) -> Result<tonic::Response<crate::pb::CurrentResponse>, Status> {
            Err(Status::unimplemented("not needed here"))
        }

        type NextStreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<NextStreamReply, Status>> + Send + 'static>,
        >;

        /// Unless `stream` is on, as a seqd from before `NextStream`: the
        /// client falls back to `NextBatch` RPCs, which this server counts.
        async fn next_stream(
            &self,
            request: tonic::Request<tonic::Streaming<NextStreamRequest>>,
        ) -> Result<tonic::Response<Self::NextStreamStream>, Status> {
            use futures::StreamExt;
            use prost::Message as _;
            use std::sync::atomic::Ordering;
            self.streams_asked.fetch_add(1, Ordering::SeqCst);
            if !self.stream.load(Ordering::SeqCst) {
                return Err(Status::unimplemented("an older server"));
            }
            let answered = self.stream_batches.clone();
            let keys = self.stream_keys.clone();
            let gate = self.gate.clone();
            let replies = request.into_inner().then(move |message| {
                let (answered, keys, gate) = (answered.clone(), keys.clone(), gate.clone());
                async move {
                    let NextStreamRequest { id, batch, .. } = message?;
                    let batch = NextBatchRequest::decode(batch.unwrap_or_default())
                        .map_err(crate::codec::decode_error)?;
                    lock(&keys).extend(batch.items.iter().map(|i| i.key.clone()));
                    if let Some(gate) = gate {
                        gate.acquire().await.expect("never closed").forget();
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    if batch.namespace == "unknown" {
                        let refusal =
                            Status::invalid_argument("namespace: unknown namespace \"unknown\"");
                        return Ok(NextStreamReply {
                            id,
                            ok: None,
                            error: Some((&refusal).into()),
                        });
                    }
                    let refused = batch.items.iter().enumerate().find_map(|(i, item)| {
                        // A key refused as such, or a summed count over
                        // the limit (the same key alone is taken).
                        if item.key.starts_with("bad") {
                            Some(format!("items[{i}].key: bad"))
                        } else if item.key.starts_with("over") && item.count > 1 {
                            Some(format!("items[{i}].count: {} is too many", item.count))
                        } else {
                            None
                        }
                    });
                    if let Some(refusal) = refused {
                        let refusal = Status::invalid_argument(refusal);
                        return Ok(NextStreamReply {
                            id,
                            ok: None,
                            error: Some((&refusal).into()),
                        });
                    }
                    Ok(NextStreamReply {
                        id,
                        ok: Some(answer_from_one(batch.items)),
                        error: None,
                    })
                }
            });
            Ok(tonic::Response::new(Box::pin(replies)))
        }
    }

    /// Serves `router` on a loopback port; returns its address.
    #[cfg(feature = "server")]
    async fn listen(router: tonic::transport::server::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    #[cfg(feature = "server")]
    async fn serve(server: CountingServer) -> std::net::SocketAddr {
        listen(
            tonic::transport::Server::builder()
                .add_service(crate::pb::sequencer_server::SequencerServer::new(server)),
        )
        .await
    }

    /// An `Ids` service that issues consecutive numbers, or refuses every
    /// call with `refuse`, recording the count each RPC asked for.
    #[cfg(feature = "server")]
    #[derive(Clone, Default)]
    struct FakeIds {
        next: Arc<std::sync::atomic::AtomicU64>,
        counts: Arc<Mutex<Vec<u32>>>,
        refuse: Option<Code>,
        /// The largest count it takes (0: any).
        max_count: u32,
        /// Answers `NextIdsStream` with UNIMPLEMENTED, as an older node.
        no_stream: bool,
        /// Calls that came on `NextIdsStream`.
        streamed: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[cfg(feature = "server")]
    #[tonic::async_trait]
    impl crate::pb::ids_server::Ids for FakeIds {
        async fn next_ids(
            &self,
            request: tonic::Request<NextIdsRequest>,
        ) -> Result<tonic::Response<NextIdsResponse>, Status> {
            let count = request.into_inner().count;
            lock(&self.counts).push(count);
            if let Some(code) = self.refuse {
                return Err(Status::new(code, "refused"));
            }
            if count == 0 || (self.max_count > 0 && count > self.max_count) {
                return Err(Status::invalid_argument(format!("count: {count}")));
            }
            let first = self.next.fetch_add(u64::from(count), Ordering::SeqCst);
            Ok(tonic::Response::new(NextIdsResponse {
                ids: (first..first + u64::from(count)).collect(),
                worker: 7,
            }))
        }

        async fn decode(
            &self,
            _: tonic::Request<crate::pb::DecodeRequest>,
        ) -> Result<tonic::Response<crate::pb::DecodeResponse>, Status> {
            Err(Status::unimplemented("not needed here"))
        }

        type NextIdsStreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<NextIdsStreamReply, Status>> + Send>,
        >;

        /// Each message answered as `next_ids` answers it.
        async fn next_ids_stream(
            &self,
            request: tonic::Request<tonic::Streaming<NextIdsStreamRequest>>,
        ) -> Result<tonic::Response<Self::NextIdsStreamStream>, Status> {
            use futures::StreamExt;
            if self.no_stream {
                return Err(Status::unimplemented("no ID stream here"));
            }
            let fake = self.clone();
            let replies = request.into_inner().then(move |message| {
                let fake = fake.clone();
                async move {
                    let NextIdsStreamRequest { id, request } = message?;
                    fake.streamed.fetch_add(1, Ordering::SeqCst);
                    let request = request.unwrap_or_default();
                    let result = fake.next_ids(tonic::Request::new(request)).await;
                    Ok(NextIdsStreamReply::answering(
                        id,
                        result.map(tonic::Response::into_inner),
                    ))
                }
            });
            Ok(tonic::Response::new(Box::pin(replies)))
        }
    }

    #[cfg(feature = "server")]
    async fn serve_ids(server: FakeIds) -> String {
        listen(
            tonic::transport::Server::builder()
                .add_service(crate::pb::ids_server::IdsServer::new(server)),
        )
        .await
        .to_string()
    }

    /// A client of `endpoints` that asks the first for IDs first.
    #[cfg(feature = "server")]
    fn ids_client(endpoints: &[String], opts: ClientOptions) -> Client {
        let client = Client::new(endpoints, opts).unwrap();
        client.inner.ids_node.store(0, Ordering::SeqCst);
        client
    }

    /// Concurrent callers share `NextIds` RPCs; each gets exactly its
    /// count, strictly increasing, and no ID goes to two callers.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn id_calls_share_rpcs_and_each_gets_its_own_ids() {
        const CALLERS: u32 = 8;
        const ROUNDS: usize = 20;
        let server = FakeIds::default();
        let client = ids_client(&[serve_ids(server.clone()).await], ClientOptions::default());
        let callers = (1..=CALLERS).map(|count| {
            let client = &client;
            async move {
                let mut got = Vec::new();
                for _ in 0..ROUNDS {
                    let r = client.next_ids(count).await.unwrap();
                    assert_eq!(r.ids.len(), count as usize);
                    assert!(r.ids.windows(2).all(|w| w[0] < w[1]), "{:?}", r.ids);
                    assert_eq!(r.worker, 7);
                    got.extend(r.ids);
                }
                got
            }
        });
        let all: Vec<u64> = futures::future::join_all(callers)
            .await
            .into_iter()
            .flatten()
            .collect();
        let unique: std::collections::HashSet<u64> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "an ID went to two callers");
        let counts = lock(&server.counts).clone();
        assert_eq!(counts.iter().map(|&c| c as usize).sum::<usize>(), all.len());
        assert!(
            counts.len() <= ROUNDS * 2,
            "{} calls took {} RPCs: {counts:?}",
            CALLERS as usize * ROUNDS,
            counts.len()
        );
        assert_eq!(
            server.streamed.load(Ordering::SeqCst),
            counts.len(),
            "every coalesced call went on the ID stream"
        );
        assert_eq!(
            lock(&client.inner.id_streams.open).len(),
            1,
            "one stream, kept"
        );
    }

    /// A node without `NextIdsStream` (an older seqd) gets the calls as
    /// `NextIds` RPCs, and is not asked for the stream again at once; with
    /// `max_in_flight` 0 every call is its own RPC, never on the stream.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn id_calls_to_a_node_without_the_stream_go_as_rpcs() {
        let old = FakeIds {
            no_stream: true,
            ..FakeIds::default()
        };
        let addr = serve_ids(old.clone()).await;
        let client = ids_client(std::slice::from_ref(&addr), ClientOptions::default());
        for _ in 0..3 {
            let r = client.next_ids(5).await.unwrap();
            assert_eq!(r.ids.len(), 5);
        }
        assert_eq!(lock(&old.counts).len(), 3);
        assert_eq!(old.streamed.load(Ordering::SeqCst), 0);
        assert!(lock(&client.inner.id_streams.missing).contains_key(&addr));
        assert!(
            lock(&client.inner.streams.missing).is_empty(),
            "the batch stream is another matter"
        );

        let new = FakeIds::default();
        let addr = serve_ids(new.clone()).await;
        let unary = ids_client(
            &[addr],
            ClientOptions {
                max_in_flight: 0,
                ..ClientOptions::default()
            },
        );
        unary.next_ids(5).await.unwrap();
        assert_eq!(lock(&new.counts).len(), 1);
        assert_eq!(new.streamed.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_id_batch_sums_to_at_most_the_limit_and_takes_a_large_call_alone() {
        let waiter = |count| IdsWaiter {
            count,
            deadline: Instant::now(),
            reply: oneshot::channel().0,
        };
        let big = MAX_COALESCED_IDS as u32;
        let mut queued = vec![waiter(1000), waiter(big - 1000), waiter(1), waiter(big + 1)];
        let counts = |b: Vec<IdsWaiter>| b.iter().map(|w| w.count).collect::<Vec<_>>();
        assert_eq!(counts(take_ids(&mut queued)), vec![1000, big - 1000]);
        assert_eq!(
            counts(take_ids(&mut queued)),
            vec![1],
            "the next would not fit"
        );
        assert_eq!(counts(take_ids(&mut queued)), vec![big + 1], "alone");
        assert!(queued.is_empty());
    }

    /// A node that cannot issue is left for the next, and the client stays
    /// there: later calls do not try the first node again.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn id_calls_move_on_from_a_node_that_cannot_issue() {
        let down = FakeIds {
            refuse: Some(Code::Unavailable),
            ..FakeIds::default()
        };
        let up = FakeIds::default();
        let endpoints = [serve_ids(down.clone()).await, serve_ids(up.clone()).await];
        let client = ids_client(&endpoints, ClientOptions::default());
        for _ in 0..3 {
            assert_eq!(client.next_ids(5).await.unwrap().ids.len(), 5);
        }
        assert_eq!(lock(&down.counts).len(), 1, "asked once");
        assert_eq!(*lock(&up.counts), vec![5, 5, 5]);
    }

    /// A refusal (clock stepped back, over capacity) is tried on every
    /// node once, then returned; bad input is returned at once.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn id_refusals_end_the_call_once_every_node_refused() {
        let refusing = || FakeIds {
            refuse: Some(Code::FailedPrecondition),
            ..FakeIds::default()
        };
        let (a, b) = (refusing(), refusing());
        let endpoints = [serve_ids(a.clone()).await, serve_ids(b.clone()).await];
        let client = ids_client(&endpoints, ClientOptions::default());
        let err = client.next_ids(1).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Rejected(s) if s.code() == Code::FailedPrecondition),
            "{err:?}"
        );
        assert_eq!(lock(&a.counts).len(), 1);
        assert_eq!(lock(&b.counts).len(), 1);

        let server = FakeIds::default();
        let client = ids_client(&[serve_ids(server.clone()).await], ClientOptions::default());
        let err = client.next_ids(0).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{err:?}");
        assert_eq!(*lock(&server.counts), vec![0], "not retried");
    }

    /// Calls whose sum a server's lower `max_count` refuses are sent one
    /// by one: each within the limit gets its IDs, one over it its error.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn id_calls_refused_together_are_sent_one_by_one() {
        let server = FakeIds {
            max_count: 10,
            ..FakeIds::default()
        };
        let opts = ClientOptions {
            max_in_flight: 1,
            ..ClientOptions::default()
        };
        let client = ids_client(&[serve_ids(server.clone()).await], opts);
        // The first goes at once and alone; the rest queue behind it and
        // go together (sum 27), which the server refuses.
        let results = futures::future::join_all([8, 8, 8, 11].map(|n| client.next_ids(n))).await;
        let lens: Vec<Result<usize, Option<Code>>> = results
            .into_iter()
            .map(|r| r.map(|r| r.ids.len()).map_err(|e| e.code()))
            .collect();
        assert_eq!(
            lens,
            vec![Ok(8), Ok(8), Ok(8), Err(Some(Code::InvalidArgument))]
        );
        let counts = lock(&server.counts).clone();
        assert_eq!(counts[..2], [8, 27], "{counts:?}");
    }

    /// A node that answered `NextStream` UNIMPLEMENTED gets batches as
    /// `NextBatch` RPCs, without being asked for the stream on each; once
    /// the recheck interval has passed the stream is tried again, and used
    /// when the node (upgraded meanwhile) has it.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_node_without_the_stream_is_asked_again_after_a_while() {
        use std::sync::atomic::Ordering;
        let server = CountingServer::default();
        let addr = serve(server.clone()).await;
        let mut client = Client::new(&[addr.to_string()], ClientOptions::default()).unwrap();
        let recheck = Duration::from_secs(2);
        Arc::get_mut(&mut client.inner)
            .expect("not shared yet")
            .no_stream_recheck = recheck;

        let first = client.next("ns", "k", 1).await.unwrap();
        assert_eq!(first.first, 1);
        assert_eq!(server.streams_asked.load(Ordering::SeqCst), 1);
        assert_eq!(
            lock(&server.calls_per_rpc).len(),
            1,
            "fell back to NextBatch"
        );
        let asked_at = Instant::now();

        // Upgraded, but the client does not ask again before the recheck.
        server.stream.store(true, Ordering::SeqCst);
        client.next("ns", "k", 1).await.unwrap();
        if asked_at.elapsed() < recheck {
            assert_eq!(server.streams_asked.load(Ordering::SeqCst), 1);
            assert_eq!(lock(&server.calls_per_rpc).len(), 2);
        }

        tokio::time::sleep_until((asked_at + recheck).into()).await;
        client.next("ns", "k", 1).await.unwrap();
        client.next("ns", "k", 1).await.unwrap();
        assert_eq!(
            server.streams_asked.load(Ordering::SeqCst),
            2,
            "asked once more, then kept"
        );
        assert_eq!(server.stream_batches.load(Ordering::SeqCst), 2);
    }

    /// A coalesced call learns that its batch's answer repeated the
    /// batch's record, on the stream and on the `NextBatch` fallback.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_replayed_batch_answer_reaches_its_callers() {
        use std::sync::atomic::Ordering;
        for stream in [true, false] {
            let server = CountingServer::default();
            server.stream.store(stream, Ordering::SeqCst);
            let addr = serve(server.clone()).await;
            let client = Client::new(&[addr.to_string()], ClientOptions::default()).unwrap();
            let fresh = client.next("ns", "k", 1).await.unwrap();
            let repeat = client.next("ns", "replayed-k", 2).await.unwrap();
            assert!(!fresh.replayed, "stream {stream}: {fresh:?}");
            assert!(repeat.replayed, "stream {stream}: {repeat:?}");
            assert_eq!(server.stream_batches.load(Ordering::SeqCst) > 0, stream);
        }
    }

    #[tokio::test]
    async fn pings_without_a_timeout_are_refused_by_name() {
        let opts = ClientOptions {
            keepalive_timeout: Duration::ZERO,
            ..ClientOptions::default()
        };
        let err = Client::new(&["127.0.0.1:1"], opts.clone()).err().unwrap();
        assert!(err.to_string().contains("keepalive_timeout"), "{err}");
        // No PINGs, no timeout needed.
        let off = ClientOptions {
            keepalive_interval: Duration::ZERO,
            ..opts
        };
        assert!(Client::new(&["127.0.0.1:1"], off).is_ok());
    }

    /// A call that got no answer is tried again, whatever tonic calls the
    /// HTTP/2 error that ended it; an INTERNAL the node answered is not.
    #[test]
    fn a_call_ended_by_http2_is_retried_but_not_an_internal_answer() {
        let http2 = |reason: h2::Reason| Status::from_error(Box::new(h2::Error::from(reason)));
        // A node stopping (GOAWAY) or tearing a stream down (RST_STREAM).
        for reason in [h2::Reason::NO_ERROR, h2::Reason::INTERNAL_ERROR] {
            let status = http2(reason);
            assert_eq!(
                status.code(),
                Code::Internal,
                "tonic's mapping of {reason:?}"
            );
            assert!(retryable(&status), "{status:?}");
        }
        assert!(retryable(&http2(h2::Reason::CANCEL)));
        assert!(retryable(&http2(h2::Reason::REFUSED_STREAM)));
        assert!(!retryable(&Status::internal("the node's own error")));
        assert!(!retryable(&Status::invalid_argument("key: empty")));
    }

    /// A client of the node at `addr` that sends every call as an RPC.
    fn one_rpc_per_call(addr: std::net::SocketAddr) -> Client {
        let opts = ClientOptions {
            max_in_flight: 0,
            ..ClientOptions::default()
        };
        Client::new(&[addr.to_string()], opts).unwrap()
    }

    /// A node that resets a call's HTTP/2 stream with INTERNAL_ERROR before
    /// answering (as a stopping or failing server does) has not answered
    /// it: tonic reports INTERNAL, and the call is tried again. A raw
    /// HTTP/2 server, so the reset is exactly that.
    #[tokio::test]
    async fn a_call_whose_stream_the_node_reset_is_tried_again() {
        use prost::Message as _;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                            respond.send_reset(h2::Reason::INTERNAL_ERROR);
                            continue;
                        }
                        let body = NextResponse {
                            first: 1,
                            count: 3,
                            epoch: 1,
                            replayed: false,
                        }
                        .encode_to_vec();
                        let mut frame = vec![0u8];
                        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
                        frame.extend_from_slice(&body);
                        let head = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(head, false).unwrap();
                        send.send_data(frame.into(), false).unwrap();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        send.send_trailers(trailers).unwrap();
                    }
                });
            }
        });
        let resp = one_rpc_per_call(addr).next("ns", "a", 3).await;
        assert_eq!(resp.map(|r| r.count).map_err(|e| e.to_string()), Ok(3));
        assert_eq!(asked.load(Ordering::SeqCst), 2, "reset once, then answered");
    }

    /// A handler that dies without answering resets its stream: the call
    /// is tried again.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_call_whose_stream_was_reset_is_tried_again() {
        let server = CountingServer::default();
        server.resets.store(2, std::sync::atomic::Ordering::SeqCst);
        let addr = serve(server.clone()).await;
        let resp = one_rpc_per_call(addr).next("ns", "a", 3).await;
        assert_eq!(resp.map(|r| r.count).map_err(|e| e.to_string()), Ok(3));
        assert_eq!(
            lock(&server.calls_per_rpc).len(),
            3,
            "two resets, one answer"
        );
    }

    /// Two nodes that name each other as the leader (each hint stale, as
    /// during an election) are each followed at once the first time only;
    /// after that the client backs off between attempts instead of
    /// bouncing between them as fast as they answer.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn hints_in_a_loop_are_followed_with_backoff() {
        let (a, b) = (CountingServer::default(), CountingServer::default());
        let (a_addr, b_addr) = (serve(a.clone()).await, serve(b.clone()).await);
        *lock(&a.redirect) = Some(b_addr.to_string());
        *lock(&b.redirect) = Some(a_addr.to_string());
        let opts = ClientOptions {
            max_in_flight: 0,
            overall_timeout: Duration::from_millis(400),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(20),
            ..ClientOptions::default()
        };
        let client = Client::new(&[a_addr.to_string(), b_addr.to_string()], opts).unwrap();
        let err = client.next("ns", "k", 1).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        let attempts = lock(&a.calls_per_rpc).len() + lock(&b.calls_per_rpc).len();
        // 400 ms of 20 ms pauses, plus the two hints followed at once.
        assert!(
            (3..=30).contains(&attempts),
            "{attempts} attempts in 400 ms between two nodes naming each other"
        );
    }

    /// A batch call goes on the stream, whole; to a node without the
    /// stream, as a `NextBatch` RPC.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_batch_call_goes_whole_on_the_stream() {
        use std::sync::atomic::Ordering;
        let server = CountingServer::streaming();
        let addr = serve(server.clone()).await;
        let client = Client::new(&[addr.to_string()], ClientOptions::default()).unwrap();
        let resp = client
            .next_batch("ns", &[("a", 1), ("b", 2)])
            .await
            .unwrap();
        let got: Vec<(&str, u32)> = resp
            .ranges
            .iter()
            .map(|r| (r.key.as_str(), r.count))
            .collect();
        assert_eq!(got, vec![("a", 1), ("b", 2)]);
        assert_eq!(server.stream_batches.load(Ordering::SeqCst), 1);
        assert!(lock(&server.calls_per_rpc).is_empty(), "no NextBatch RPC");

        let older = CountingServer::default();
        let addr = serve(older.clone()).await;
        let client = Client::new(&[addr.to_string()], ClientOptions::default()).unwrap();
        let resp = client
            .next_batch("ns", &[("a", 1), ("b", 2)])
            .await
            .unwrap();
        assert_eq!(resp.ranges.len(), 2);
        assert_eq!(*lock(&older.calls_per_rpc), vec![3], "one NextBatch RPC");
    }

    /// A batch answered with a range of another count than its item asked
    /// for is refused as the server's error, on the stream and by the
    /// RPC, whether the keys come back or not: the caller gets no numbers
    /// it did not ask for.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_batch_answered_with_other_counts_is_refused() {
        use std::sync::atomic::Ordering;
        let server = CountingServer::streaming();
        let addr = serve(server.clone()).await;
        for max_in_flight in [4, 0] {
            let opts = ClientOptions {
                max_in_flight,
                ..ClientOptions::default()
            };
            let client = Client::new(&[addr.to_string()], opts).unwrap();
            let items = [("a", 2), ("misfit", 3)];
            let expected = "NextBatch item 1 asked for 3 numbers and was answered with 4";
            for err in [
                client.next_batch("ns", &items).await.unwrap_err(),
                client.next_batch_ranges("ns", &items).await.unwrap_err(),
            ] {
                let ClientError::Rejected(status) = err else {
                    panic!("{err:?}");
                };
                assert_eq!(status.code(), Code::Internal, "{status:?}");
                assert_eq!(status.message(), expected);
            }
            let fits = client.next_batch_ranges("ns", &[("a", 2)]).await.unwrap();
            assert_eq!(fits.ranges, vec![BatchRange { first: 1, count: 2 }]);
        }
        assert_eq!(server.stream_batches.load(Ordering::SeqCst), 3);
        // Coalesced calls on the stream: each caller refused, none given
        // numbers (the server was asked for the two calls' sum, 5).
        let client = Client::new(&[addr.to_string()], ClientOptions::default()).unwrap();
        let (a, b) = tokio::join!(
            client.next("ns", "misfit", 2),
            client.next("ns", "misfit", 3)
        );
        for result in [a, b] {
            let Err(ClientError::Rejected(status)) = result else {
                panic!("{result:?}");
            };
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            assert!(
                status.message().starts_with("NextBatch item 0 asked for "),
                "{status:?}"
            );
        }
        // A single call by its own RPC (an idempotency token) as well.
        let client = Client::new(&[addr.to_string()], ClientOptions::default()).unwrap();
        let err = client
            .next_with_id("ns", "misfit", 3, "r-1")
            .await
            .unwrap_err();
        let ClientError::Rejected(status) = err else {
            panic!("{err:?}");
        };
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert_eq!(
            status.message(),
            "Next asked for 3 numbers and was answered with 4"
        );
        let fits = client.next_with_id("ns", "a", 3, "r-2").await.unwrap();
        assert_eq!((fits.first, fits.count), (1, 3));
        // The RPCs' calls all reached the server.
        assert_eq!(lock(&server.calls_per_rpc).len(), 5);
    }

    /// A batch encoded from borrowed keys is the bytes prost writes for the
    /// same request, whatever its strings and counts (empty, zero, long,
    /// not ASCII).
    #[test]
    fn a_batch_encodes_as_prost_encodes_it() {
        use proptest::prelude::*;
        use prost::Message as _;
        let text = || {
            prop_oneof![
                Just(String::new()),
                "[a-z0-9:]{1,30}",
                "\\PC{1,5}",
                "[a-z]{120,200}",
            ]
        };
        let count = || prop_oneof![Just(0u32), 1u32..200, Just(u32::MAX)];
        let batch = (
            text(),
            proptest::collection::vec((text(), count()), 0..20),
            text(),
        );
        proptest!(|((namespace, items, request_id) in batch)| {
            let borrowed = items.iter().map(|(k, c)| (k.as_str(), *c));
            let ours = encode_batch(&namespace, borrowed, &request_id);
            let prost = NextBatchRequest {
                namespace,
                items: items
                    .into_iter()
                    .map(|(key, count)| BatchItem { key, count })
                    .collect(),
                request_id,
            }
            .encode_to_vec();
            prop_assert_eq!(ours.as_ref(), prost.as_slice());
        });
    }

    /// The client reads a batch reply without the keys the node echoes
    /// (`StreamAnswer`): it reads the ranges, epoch and failures the node
    /// sent; `next_batch` names each range with the request's key, and
    /// `next_batch_ranges` gives them in the request's order.
    #[test]
    fn a_stream_reply_reads_the_same_without_its_keys() {
        use prost::Message as _;
        let sent = NextBatchResponse {
            ranges: vec![
                crate::pb::Range {
                    key: "conv:1".into(),
                    first: 7,
                    count: 2,
                },
                crate::pb::Range {
                    key: "\u{e9}".repeat(300),
                    first: u64::MAX - 1,
                    count: 1,
                },
            ],
            epoch: 3,
            replayed: true,
            ..NextBatchResponse::default()
        };
        let reply = NextStreamReply::answering(42, Ok(sent.clone()));
        let read = StreamAnswer::decode(reply.encode_to_vec().as_slice()).unwrap();
        let (id, answer) = Batches::split(read);
        assert_eq!(id, 42);
        let items: Vec<(&str, u32)> = sent
            .ranges
            .iter()
            .map(|r| (r.key.as_str(), r.count))
            .collect();
        assert_eq!(answer.unwrap().with_keys(&items).unwrap(), sent);

        // The same ranges packed, as the client asks for them.
        let packed = NextBatchResponse {
            ranges: Vec::new(),
            firsts: sent.ranges.iter().map(|r| r.first).collect(),
            counts: sent.ranges.iter().map(|r| r.count).collect(),
            ..sent.clone()
        };
        let reply = NextStreamReply::answering(43, Ok(packed.clone()));
        let read = StreamAnswer::decode(reply.encode_to_vec().as_slice()).unwrap();
        let answer = Batches::split(read).1.unwrap();
        assert_eq!(answer.clone().with_keys(&items).unwrap(), sent);
        // Without the keys: the same ranges, in the items' order.
        let ranges = answer.clone().ranges_for(&items).unwrap();
        assert_eq!(
            ranges,
            BatchRanges {
                ranges: vec![
                    BatchRange { first: 7, count: 2 },
                    BatchRange {
                        first: u64::MAX - 1,
                        count: 1
                    },
                ],
                epoch: 3,
                replayed: true,
            }
        );
        for other in [&items[..1], &[items[0], items[1], ("c", 1)][..]] {
            let err = answer.clone().ranges_for(other).unwrap_err();
            assert_eq!(err.code(), Code::Internal, "{err:?}");
        }
        // Lists that do not pair up, or packed ranges beside others, are
        // the server's error.
        for bad in [
            NextBatchResponse {
                counts: vec![2],
                ..packed.clone()
            },
            NextBatchResponse {
                ranges: sent.ranges.clone(),
                ..packed.clone()
            },
        ] {
            let reply = NextStreamReply::answering(44, Ok(bad));
            let read = StreamAnswer::decode(reply.encode_to_vec().as_slice()).unwrap();
            let answer = Batches::split(read).1.unwrap();
            assert!(answer.ranges.is_empty(), "{answer:?}");
            assert!(answer.with_keys(&items).is_err());
        }

        let mut refused = Status::unavailable("not the leader");
        refused
            .metadata_mut()
            .insert(LEADER_ADDR_HEADER, "127.0.0.1:7002".parse().unwrap());
        let reply = NextStreamReply::answering(9, Err(refused));
        let read = StreamAnswer::decode(reply.encode_to_vec().as_slice()).unwrap();
        assert_eq!((read.id, read.ok), (9, None));
        assert_eq!(read.error, reply.error);
    }

    /// A batch goes out encoded once, as the request the client built (an
    /// empty one too: as an empty batch, which the node refuses by name,
    /// not as a message without one), and asks for ranges without keys.
    #[test]
    fn a_stream_call_carries_the_request_it_was_built_from() {
        use prost::Message as _;
        for batch in [
            NextBatchRequest {
                namespace: "conv".into(),
                items: vec![
                    BatchItem {
                        key: "a".into(),
                        count: 3,
                    },
                    BatchItem {
                        key: "\u{e9}".repeat(300),
                        count: 1,
                    },
                ],
                request_id: "r-1".into(),
            },
            NextBatchRequest::default(),
        ] {
            let body = prost::bytes::Bytes::from(batch.encode_to_vec());
            let sent = Batches::message(5, body).encode_to_vec();
            let read = NextStreamRequest::decode(sent.as_slice()).unwrap();
            assert_eq!((read.id, read.packed_ranges), (5, true));
            let carried = read.batch.expect("an empty batch is sent as one");
            assert_eq!(NextBatchRequest::decode(carried).unwrap(), batch);
        }
    }

    /// An answer whose ranges do not pair with the request's items, by
    /// number or by count, is the server's error, not a response with keys
    /// left out or numbers the caller did not ask for.
    #[test]
    fn an_answer_that_does_not_fit_the_items_is_refused() {
        let answer = BatchAnswer {
            ranges: vec![RangeAnswer { first: 1, count: 1 }],
            epoch: 1,
            ..BatchAnswer::default()
        };
        let err = answer.clone().with_keys(&[("a", 1), ("b", 1)]).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert_eq!(err.message(), "NextBatch of 2 keys answered with 1 ranges");
        let two = BatchAnswer {
            ranges: vec![
                RangeAnswer { first: 1, count: 2 },
                RangeAnswer { first: 9, count: 0 },
            ],
            epoch: 1,
            ..BatchAnswer::default()
        };
        for err in [
            two.clone().with_keys(&[("a", 2), ("b", 3)]).unwrap_err(),
            two.clone().ranges_for(&[("a", 2), ("b", 3)]).unwrap_err(),
        ] {
            assert_eq!(err.code(), Code::Internal);
            assert_eq!(
                err.message(),
                "NextBatch item 1 asked for 3 numbers and was answered with 0"
            );
        }
        let err = two.ranges_for(&[("a", 1), ("b", 0)]).unwrap_err();
        assert_eq!(
            err.message(),
            "NextBatch item 0 asked for 1 numbers and was answered with 2"
        );
        assert!(answer.ranges_for(&[("a", 1)]).is_ok());
    }

    /// Callers answered by one RPC that call again at once go out together
    /// in the next RPC, not one ahead and the rest a round trip behind it.
    /// (A current-thread runtime makes the order of tasks deterministic.)
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn callers_answered_together_ride_the_next_rpc_together() {
        const CALLERS: usize = 8;
        const ROUNDS: usize = 20;
        let server = CountingServer::default();
        let addr = serve(server.clone()).await;
        // No spacing: only the gathering keeps callers who call again
        // from starting RPCs of their own (a free slot lets them). With the
        // default 1 ms spacing the outcome hung on the round trip: one
        // slower than the spacing (a debug build beside other tests) let
        // the spacing timer split the callers in two groups for good.
        let opts = ClientOptions {
            rpc_spacing: Duration::ZERO,
            ..ClientOptions::default()
        };
        let client = Client::new(&[addr.to_string()], opts).unwrap();
        let callers = (0..CALLERS).map(|c| {
            let client = &client;
            async move {
                for _ in 0..ROUNDS {
                    client.next("ns", &format!("k{c}"), 1).await.unwrap();
                }
            }
        });
        futures::future::join_all(callers).await;
        let sizes = lock(&server.calls_per_rpc).clone();
        assert_eq!(sizes.iter().sum::<usize>(), CALLERS * ROUNDS, "{sizes:?}");
        // The first caller goes alone (nothing is out yet); from then on
        // all eight ride together.
        let full = sizes.iter().filter(|&&n| n == CALLERS).count();
        assert!(full >= ROUNDS - 1, "RPCs carrying all callers: {sizes:?}");
    }

    #[test]
    fn a_batch_groups_calls_by_key_in_queue_order() {
        let mut queued = vec![waiter("a", 1), waiter("b", 2), waiter("a", 3)];
        let items = take_batch(&mut queued);
        assert!(queued.is_empty());
        let got: Vec<(&str, u32, Vec<u32>)> = items
            .iter()
            .map(|i| {
                let counts = i.waiters.iter().map(|w| w.count).collect();
                (i.key.as_str(), i.count, counts)
            })
            .collect();
        assert_eq!(got, vec![("a", 4, vec![1, 3]), ("b", 2, vec![2])]);
    }

    #[test]
    fn what_does_not_fit_waits_for_the_next_batch() {
        let mut queued: Vec<Waiter> = (0..MAX_COALESCED + 2)
            .map(|i| waiter(&format!("k{i}"), 1))
            .collect();
        queued.push(waiter("k0", u32::MAX));
        let items = take_batch(&mut queued);
        assert_eq!(items.len(), MAX_COALESCED);
        // Two keys over the limit, and a count that would overflow k0's sum.
        let left: Vec<&str> = queued.iter().map(|w| w.key.as_str()).collect();
        let last = format!("k{}", MAX_COALESCED + 1);
        let before = format!("k{MAX_COALESCED}");
        assert_eq!(left, vec![before.as_str(), last.as_str(), "k0"]);
    }

    /// A call whose caller gave up while it was queued is not sent (its
    /// numbers would be a hole no caller saw); one queued past its
    /// deadline fails as the overall timeout promises; the rest go.
    #[test]
    fn queued_calls_given_up_or_past_their_deadline_are_not_sent() {
        let now = Instant::now();
        let (gone, _) = waiter_due("gone", 1, now + Duration::from_secs(60));
        let (late, mut late_answer) = waiter_due("late", 1, now);
        let mut queued = vec![gone, late, waiter("live", 1)];
        let items = Seqs::take(&mut queued);
        let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec!["live"]);
        match late_answer.try_recv() {
            Ok(Err(ClientError::Exhausted { attempts: 0, last }))
                if last.code() == Code::DeadlineExceeded => {}
            other => panic!("the late call: {other:?}"),
        }

        let (gone, answer) = oneshot::channel();
        drop(answer);
        let (live, _answer) = oneshot::channel();
        let mut queued = vec![
            IdsWaiter {
                count: 5,
                deadline: now + Duration::from_secs(60),
                reply: gone,
            },
            IdsWaiter {
                count: 7,
                deadline: now + Duration::from_secs(60),
                reply: live,
            },
        ];
        let batch = Ids::take(&mut queued);
        assert_eq!(batch.iter().map(|w| w.count).collect::<Vec<_>>(), vec![7]);
    }

    /// A streaming server that answers a batch only for a permit of the
    /// returned gate (none yet), and a client of it with one RPC slot and
    /// no spacing: while one batch is held, calls queue.
    #[cfg(feature = "server")]
    async fn held_server_and_one_slot() -> (CountingServer, Arc<tokio::sync::Semaphore>, Arc<Client>)
    {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let server = CountingServer {
            gate: Some(gate.clone()),
            ..CountingServer::streaming()
        };
        let addr = serve(server.clone()).await;
        let opts = ClientOptions {
            max_in_flight: 1,
            rpc_spacing: Duration::ZERO,
            ..ClientOptions::default()
        };
        let client = Arc::new(Client::new(&[addr.to_string()], opts).unwrap());
        (server, gate, client)
    }

    /// `client.next("ns", key, 1)` on a task of its own.
    fn spawn_next(
        client: &Arc<Client>,
        key: &'static str,
    ) -> tokio::task::JoinHandle<Result<NextResponse, ClientError>> {
        let client = client.clone();
        tokio::spawn(async move { client.next("ns", key, 1).await })
    }

    /// Until `server` has seen `n` keys on its streams.
    #[cfg(feature = "server")]
    async fn wait_stream_keys(server: &CountingServer, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&server.stream_keys).len() < n {
            assert!(Instant::now() < deadline, "{n} keys never reached the node");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Until `n` calls are queued in lane `ns`.
    async fn wait_queued(client: &Client, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&client.inner.lanes)["ns"].queued.len() < n {
            assert!(Instant::now() < deadline, "{n} calls never queued");
            tokio::task::yield_now().await;
        }
    }

    /// End to end: while the only RPC slot waits for its answer, a call
    /// queues and its caller gives up; the next RPC carries only the call
    /// still waited for.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_queued_call_whose_caller_gave_up_is_not_sent() {
        let (server, gate, client) = held_server_and_one_slot().await;
        let first = spawn_next(&client, "a");
        wait_stream_keys(&server, 1).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), client.next("ns", "b", 1));
        assert!(gave_up.await.is_err(), "queued behind the held RPC");
        let last = spawn_next(&client, "c");
        wait_queued(&client, 2).await;
        gate.add_permits(10);
        first.await.unwrap().unwrap();
        last.await.unwrap().unwrap();
        assert_eq!(*lock(&server.stream_keys), vec!["a", "c"]);
    }

    /// A call queued behind an RPC that retries until its own deadline
    /// gives up at the queued call's deadline, not an overall timeout after
    /// the slot freed.
    #[tokio::test]
    async fn a_call_queued_behind_retries_gives_up_at_its_own_deadline() {
        let opts = ClientOptions {
            overall_timeout: Duration::from_millis(1000),
            attempt_timeout: Duration::from_millis(100),
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            max_in_flight: 1,
            rpc_spacing: Duration::ZERO,
            ..ClientOptions::default()
        };
        let client = Arc::new(Client::new(&["127.0.0.1:1"], opts).unwrap());
        let first = spawn_next(&client, "a");
        // Queued behind the first call's RPC, which retries for 1 s.
        let out = Instant::now() + Duration::from_secs(10);
        while lock(&client.inner.lanes)
            .get("ns")
            .is_none_or(|l| l.in_flight == 0)
        {
            assert!(Instant::now() < out, "the first call never went out");
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let second = client.next("ns", "b", 1).await;
        let took = started.elapsed();
        assert!(
            matches!(second, Err(ClientError::Exhausted { .. })),
            "{second:?}"
        );
        assert!(first.await.unwrap().is_err());
        // Its overall timeout is 1 s, reached as the first call's retries
        // end: it fails then (see `prune`); sent with a deadline of its
        // own, it had retried another second.
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_millis(1500),
            "gave up after {took:?}"
        );
    }

    /// An attempt waits for its reply no longer than the call's deadline;
    /// the stream it waited on is closed (the calls on it still get their
    /// replies; new ones open another), and the leader guess stays: the
    /// node was too slow for this call, which says nothing to the others.
    /// A call held in a unary attempt (a node without the stream) is
    /// answered at its deadline too, though the attempt runs on.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn an_attempt_ends_at_the_calls_deadline() {
        let opts = ClientOptions {
            overall_timeout: Duration::from_millis(300),
            attempt_timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        for streaming in [true, false] {
            let mut server = CountingServer {
                gate: Some(Arc::new(tokio::sync::Semaphore::new(0))),
                ..CountingServer::default()
            };
            if streaming {
                server = CountingServer {
                    gate: server.gate,
                    ..CountingServer::streaming()
                };
            }
            let addr = serve(server.clone()).await.to_string();
            let client = Client::new(std::slice::from_ref(&addr), opts.clone()).unwrap();
            client.inner.set_leader(Some(addr.clone()));
            let started = Instant::now();
            let got = client.next("ns", "a", 1).await;
            let took = started.elapsed();
            match &got {
                Err(ClientError::Exhausted { last, .. })
                    if last.code() == Code::DeadlineExceeded => {}
                other => panic!("streaming {streaming}: {other:?}"),
            }
            assert!(
                took < Duration::from_secs(2),
                "streaming {streaming}: waited {took:?}"
            );
            if streaming {
                // Once the task that sent the batch gave up too (at the
                // same deadline), the guess is still the node.
                let done = Instant::now() + Duration::from_secs(2);
                while in_flight(&client) > 0 {
                    assert!(Instant::now() < done, "the batch's task never ended");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(client.inner.leader_guess(), Some(addr.clone()));
                // The caller is answered at its deadline; the task that sent
                // its batch closes the stream at the same moment.
                let closing = Instant::now() + Duration::from_secs(2);
                while lock(&client.inner.streams.open)[&addr].is_open() {
                    assert!(
                        Instant::now() < closing,
                        "the stream that let the reply wait is still used"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }

    /// A backoff that reaches the deadline ends the call: no attempt
    /// starts after it.
    #[tokio::test]
    async fn no_attempt_starts_after_the_deadline() {
        let opts = ClientOptions {
            backoff_min: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        let mut retry = Retry::until(Instant::now() + Duration::from_millis(30), &opts);
        retry.attempts = 1;
        let got = retry.after(Status::unavailable("down"), true).await;
        assert!(
            matches!(got, Err(ClientError::Exhausted { attempts: 1, .. })),
            "{got:?}"
        );
    }

    /// Timeouts past what an `Instant` holds (`Duration::MAX` for "never
    /// give up") and a backoff that doubles past what a `Duration` holds
    /// do not panic.
    #[tokio::test]
    async fn timeouts_too_large_for_an_instant_do_not_panic() {
        let opts = ClientOptions {
            overall_timeout: Duration::MAX,
            attempt_timeout: Duration::MAX,
            backoff_max: Duration::MAX,
            ..ClientOptions::default()
        };
        let client = Client::new(&["127.0.0.1:1"], opts.clone()).unwrap();
        assert!(client.inner.deadline() > Instant::now() + Duration::from_secs(3600));
        let mut retry = Retry::until(Instant::now() + Duration::from_millis(5), &opts);
        retry.backoff = Duration::MAX / 2 + Duration::from_secs(1);
        let got = retry.after(Status::unavailable("down"), true).await;
        assert!(matches!(got, Err(ClientError::Exhausted { .. })), "{got:?}");
        // A whole call with an attempt timeout of `Duration::MAX`.
        let opts = ClientOptions {
            overall_timeout: Duration::from_millis(100),
            ..opts
        };
        let client = Client::new(&["127.0.0.1:1"], opts).unwrap();
        let got = client.next("ns", "k", 1).await;
        assert!(matches!(got, Err(ClientError::Exhausted { .. })), "{got:?}");
    }

    /// A hint naming the leader by id alone (the node does not know its
    /// address) is followed to the endpoint that node has.
    #[tokio::test]
    async fn a_hint_with_the_leaders_id_and_no_address_is_followed() {
        let client =
            Client::new(&["127.0.0.1:1", "127.0.0.1:2"], ClientOptions::default()).unwrap();
        client.inner.lock_ids().insert(2, "127.0.0.1:2".into());
        let mut status = Status::unavailable("not the leader; the leader is node 2");
        status
            .metadata_mut()
            .insert(LEADER_ADDR_HEADER, "".parse().unwrap());
        status
            .metadata_mut()
            .insert(LEADER_ID_HEADER, tonic::metadata::MetadataValue::from(2u64));
        let hint = client.inner.follow_hint(&status, "127.0.0.1:1").await;
        assert_eq!(hint.as_deref(), Some("127.0.0.1:2"));
    }

    /// Nodes are asked for their ids all at once, and not again within a
    /// second: endpoints that accept a connection and never answer cost a
    /// lookup 300 ms, not 300 ms each, and the next lookup nothing.
    #[tokio::test]
    async fn node_ids_are_asked_of_every_node_at_once_and_not_too_often() {
        let silent: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let endpoints: Vec<String> = silent
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let client = Client::new(&endpoints, ClientOptions::default()).unwrap();
        let started = Instant::now();
        client.inner.learn_ids().await;
        let first = started.elapsed();
        assert!(
            first >= Duration::from_millis(290) && first < Duration::from_millis(800),
            "first lookup {first:?}"
        );
        let started = Instant::now();
        client.inner.learn_ids().await;
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "asked again at once"
        );
    }

    /// A batch the server refuses for one item's key: that item's calls get
    /// the refusal with the fields of their own call (`key:`, not the
    /// batch's `items[1].key:`; I6), also a call that went alone, and the
    /// other calls go again as one batch. A refusal of a summed count
    /// (calls merged on one key): each call is asked for on its own.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_refused_key_fails_its_calls_and_the_rest_go_again_together() {
        let (server, gate, client) = held_server_and_one_slot().await;
        gate.add_permits(1);
        let alone = client.next("ns", "bad-alone", 1).await;
        match &alone {
            Err(ClientError::Rejected(s)) if s.code() == Code::InvalidArgument => {
                assert_eq!(s.message(), "key: bad")
            }
            other => panic!("{other:?}"),
        }

        // Held behind a first call, a bad and two good calls share a batch.
        let first = spawn_next(&client, "first");
        wait_stream_keys(&server, 2).await;
        let good1 = spawn_next(&client, "good1");
        let bad = spawn_next(&client, "bad");
        let good2 = spawn_next(&client, "good2");
        wait_queued(&client, 3).await;
        // The first, the refused batch, the good calls' batch.
        gate.add_permits(3);
        first.await.unwrap().unwrap();
        assert_eq!(good1.await.unwrap().unwrap().count, 1);
        assert_eq!(good2.await.unwrap().unwrap().count, 1);
        match bad.await.unwrap() {
            Err(ClientError::Rejected(s)) if s.code() == Code::InvalidArgument => {
                assert_eq!(s.message(), "key: bad")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            lock(&server.stream_keys)[2..].to_vec(),
            vec!["good1", "bad", "good2", "good1", "good2"],
            "the batch, then the good calls again as one"
        );
        assert!(lock(&server.calls_per_rpc).is_empty(), "none asked alone");

        // Two calls merged on one key, over the limit together: each alone.
        let first = spawn_next(&client, "first-again");
        wait_stream_keys(&server, 8).await;
        let over: Vec<_> = (0..2).map(|_| spawn_next(&client, "over")).collect();
        wait_queued(&client, 2).await;
        // The first and the refused batch (the calls alone are unary).
        gate.add_permits(2);
        first.await.unwrap().unwrap();
        for call in over {
            assert_eq!(call.await.unwrap().unwrap().count, 1);
        }
        assert_eq!(*lock(&server.calls_per_rpc), vec![1, 1], "each asked alone");
    }

    /// A batch refused for its namespace fails every call in it at once:
    /// each alone would be refused the same, so none is sent again.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_batch_refused_for_its_namespace_is_not_split() {
        let (server, gate, client) = held_server_and_one_slot().await;
        let first = tokio::spawn({
            let client = client.clone();
            async move { client.next("unknown", "first", 1).await }
        });
        wait_stream_keys(&server, 1).await;
        let queued: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|key| {
                let client = client.clone();
                tokio::spawn(async move { client.next("unknown", key, 1).await })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&client.inner.lanes)
            .get("unknown")
            .is_none_or(|lane| lane.queued.len() < 3)
        {
            assert!(Instant::now() < deadline, "3 calls never queued");
            tokio::task::yield_now().await;
        }
        gate.add_permits(10);
        for call in std::iter::once(first).chain(queued) {
            let got = call.await.unwrap();
            assert!(
                matches!(&got, Err(ClientError::Rejected(s))
                    if s.code() == Code::InvalidArgument && s.message().starts_with("namespace:")),
                "{got:?}"
            );
        }
        assert_eq!(lock(&server.stream_keys).len(), 4, "two batches");
        assert!(lock(&server.calls_per_rpc).is_empty(), "none asked alone");
    }

    #[test]
    fn a_refused_key_is_read_from_the_field_the_server_names() {
        let read = |code: Code, message: &str| refused_key(&Status::new(code, message));
        assert_eq!(
            read(Code::InvalidArgument, "items[12].key: must not be empty"),
            Some((12, "key: must not be empty".to_string()))
        );
        for message in [
            "items[1].count: 2000 is above the namespace's maximum of 1000",
            "items: 20000 items is more than the maximum of 10000",
            "items[0].key: \"a\" appears more than once",
            "items[x].key: must not be empty",
            "namespace: unknown namespace \"n\"",
        ] {
            assert_eq!(read(Code::InvalidArgument, message), None, "{message}");
        }
        assert_eq!(read(Code::ResourceExhausted, "items[0].key: x"), None);
    }

    /// A batch sent again after a refusal leaves out the calls given up on
    /// meanwhile (its item's count with them) and fails those past their
    /// deadline.
    #[test]
    fn a_batch_sent_again_leaves_out_calls_given_up_on() {
        let now = Instant::now();
        let (gone, _) = waiter_due("", 2, now + Duration::from_secs(60));
        let (late, mut late_answer) = waiter_due("", 1, now);
        let mut batch = vec![
            Item {
                key: "a".into(),
                count: 5,
                waiters: vec![gone, waiter("", 3)],
            },
            Item {
                key: "b".into(),
                count: 1,
                waiters: vec![late],
            },
        ];
        prune_items(&mut batch, now);
        let left: Vec<(&str, u32, usize)> = batch
            .iter()
            .map(|i| (i.key.as_str(), i.count, i.waiters.len()))
            .collect();
        assert_eq!(left, vec![("a", 3, 1)]);
        assert!(matches!(
            late_answer.try_recv(),
            Ok(Err(ClientError::Exhausted { .. }))
        ));
    }

    /// The server names one bad key per refusal: after a few, the rest of
    /// the batch goes call by call rather than a round trip per bad key.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn many_refused_keys_send_the_rest_call_by_call() {
        let (server, gate, client) = held_server_and_one_slot().await;
        let first = spawn_next(&client, "first");
        wait_stream_keys(&server, 1).await;
        let keys = ["bad1", "bad2", "bad3", "bad4", "bad5", "good"];
        let calls: Vec<_> = keys.iter().map(|k| spawn_next(&client, k)).collect();
        wait_queued(&client, keys.len()).await;
        // The first, then the batch refused for bad1, bad2, bad3 and bad4.
        gate.add_permits(1 + MAX_KEYS_REFUSED + 1);
        first.await.unwrap().unwrap();
        for (key, call) in keys.iter().zip(calls) {
            let answered = tokio::time::timeout(Duration::from_secs(10), call).await;
            let answer = answered.expect("answered without more batches").unwrap();
            match (answer, key.starts_with("bad")) {
                (Err(ClientError::Rejected(s)), true) => assert_eq!(s.message(), "key: bad"),
                (Ok(r), false) => assert_eq!(r.count, 1),
                (other, _) => panic!("{key}: {other:?}"),
            }
        }
        let sent = lock(&server.stream_keys).len() - 1;
        assert_eq!(sent, 6 + 5 + 4 + 3, "four batches, each one key shorter");
        assert_eq!(
            lock(&server.calls_per_rpc).len(),
            3,
            "bad4, bad5 and good asked alone"
        );
    }

    /// End to end: a call given up on while its batch was out, refused
    /// for another call's key, is not in the batch sent again.
    #[cfg(feature = "server")]
    #[tokio::test]
    async fn a_call_given_up_on_is_not_sent_again_after_a_refused_key() {
        let (server, gate, client) = held_server_and_one_slot().await;
        let first = spawn_next(&client, "first");
        wait_stream_keys(&server, 1).await;
        let bad = spawn_next(&client, "bad");
        let good = spawn_next(&client, "good");
        let gone = tokio::spawn({
            let client = client.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(300), client.next("ns", "gone", 1)).await
            }
        });
        wait_queued(&client, 3).await;
        // The first; then the batch of the three is out, and held.
        gate.add_permits(1);
        first.await.unwrap().unwrap();
        wait_stream_keys(&server, 4).await;
        assert!(gone.await.unwrap().is_err(), "its caller gave up");
        // The refused batch, and the one sent again.
        gate.add_permits(2);
        assert!(bad.await.unwrap().is_err());
        assert_eq!(good.await.unwrap().unwrap().count, 1);
        assert_eq!(
            lock(&server.stream_keys)[1..].to_vec(),
            vec!["bad", "good", "gone", "good"]
        );
    }

    /// A coalesced RPC retries until the first of its calls is due, not an
    /// overall timeout from when it was sent; every call in it gets the
    /// failure.
    #[tokio::test]
    async fn a_batch_retries_until_its_first_call_is_due() {
        let opts = ClientOptions {
            overall_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_millis(100),
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            ..ClientOptions::default()
        };
        let client = Client::new(&["127.0.0.1:1"], opts).unwrap();
        let started = Instant::now();
        let due = |ms| waiter_due("", 1, started + Duration::from_millis(ms));
        let ((soon, soon_answer), (later, later_answer)) = (due(300), due(5_000));
        let batch = vec![Item {
            key: "k".into(),
            count: 2,
            waiters: vec![later, soon],
        }];
        client.inner.serve_batch("ns", batch).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "retried for {took:?}");
        for answer in [soon_answer, later_answer] {
            let got = answer.await.unwrap();
            assert!(matches!(got, Err(ClientError::Exhausted { .. })), "{got:?}");
        }
    }
}
