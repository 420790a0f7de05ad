//! Every metric seqd exports, in one place, and the Prometheus exporter.
//!
//! Names follow Prometheus conventions: `_seconds` for durations, `_total`
//! for counters. Labels are bounded: `op` is an RPC name, `code` a gRPC code.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// Latency of one public call, by `op`.
pub const REQUEST_SECONDS: &str = "seqd_request_duration_seconds";
/// Public calls by `op` and result `code`.
pub const REQUESTS_TOTAL: &str = "seqd_requests_total";
/// `NextStream`s opened by clients (each then carries many batches, counted
/// as `NextBatch` in the two above): a count that keeps rising under
/// steady load means clients keep losing their streams.
pub const NEXT_STREAMS_TOTAL: &str = "seqd_next_streams_opened_total";
/// `NextStream`s open now: about one per client process and node.
pub const NEXT_STREAMS_OPEN: &str = "seqd_next_streams_open";
/// `NextIdsStream`s opened by clients, and open now (each carries many
/// `NextIds` calls, counted as `NextIds`): as the two above.
pub const ID_STREAMS_TOTAL: &str = "seqd_id_streams_opened_total";
pub const ID_STREAMS_OPEN: &str = "seqd_id_streams_open";
/// How long the newest idempotency records dropped last had been kept
/// (records are bounded by count and ranges, not time), by `records`:
/// `served`, the leader's records of the calls it answered (segmented
/// calls rely on them), and `applied`, every node's records of the dense
/// calls the log applied. A record lasts between this and about twice
/// this: a client retry that comes later than this after its first attempt
/// may get new numbers, and the first attempt's are then a hole. Compare
/// with the clients' attempt and overall timeouts.
pub const REQUEST_RECORDS_KEPT_SECONDS: &str = "seqd_request_records_kept_seconds";
/// Dense grants whose caller was gone when their raise committed (it gave
/// up, timed out or disconnected), with no retry of its request id waiting:
/// numbers taken that no one saw, a hole in a gap-free namespace unless the
/// caller retries with the same request id. The epoch does not announce
/// such a hole (nothing failed on seqd's side); this counts them.
pub const DENSE_UNANSWERED_TOTAL: &str = "seqd_dense_grants_unanswered_total";
/// Keys whose ceiling was raised ahead of demand (segment refills).
pub const REFILLS_TOTAL: &str = "seqd_segment_refills_total";
/// Calls that found no room and waited for a refill to commit.
pub const REFILL_WAITS_TOTAL: &str = "seqd_refill_waits_total";
/// Idle keys whose unused room a serving leader released through the log
/// (applied) before they left its memory.
pub const IDLE_RELEASES_TOTAL: &str = "seqd_idle_key_releases_total";
/// Raft term, leader flag (1 on the leader), commit and applied index.
pub const RAFT_TERM: &str = "seqd_raft_term";
pub const RAFT_IS_LEADER: &str = "seqd_raft_is_leader";
pub const RAFT_COMMIT_INDEX: &str = "seqd_raft_commit_index";
pub const RAFT_APPLIED_INDEX: &str = "seqd_raft_applied_index";
/// Entries proposed by this node, by `kind`.
pub const RAFT_PROPOSALS_TOTAL: &str = "seqd_raft_proposals_total";
/// Times this node learned of a new leader (passing through "no leader"
/// on the way is not a change of its own).
pub const RAFT_LEADER_CHANGES_TOTAL: &str = "seqd_raft_leader_changes_total";
/// Time to write entries and hard state to RocksDB (the node loop's part;
/// the fsync they need runs on the sync thread, see the next).
pub const RAFT_APPEND_SECONDS: &str = "seqd_raft_log_append_seconds";
/// Time of one fsync of the Raft log by the sync thread (it covers every
/// write made before it).
pub const RAFT_SYNC_SECONDS: &str = "seqd_raft_log_sync_seconds";
/// How long the oldest write still waiting for its fsync has waited (0 when
/// none does): a disk going bad shows here before the node gives up on it.
pub const RAFT_SYNC_PENDING_SECONDS: &str = "seqd_raft_log_sync_pending_seconds";
/// ReadIndex rounds (leadership confirmations), one per batch of calls.
pub const RAFT_READ_ROUNDS_TOTAL: &str = "seqd_raft_read_index_rounds_total";
/// Read rounds sent to every follower again because the followers chosen
/// for them answered slowly.
pub const RAFT_READ_RESENDS_TOTAL: &str = "seqd_raft_read_index_resends_total";
/// Time from sending a ReadIndex round to its confirmation by a majority:
/// the part of a call's latency spent proving leadership.
pub const RAFT_READ_ROUND_SECONDS: &str = "seqd_raft_read_index_round_seconds";
pub const LEASE_READS_TOTAL: &str = "seqd_lease_reads_total";
/// The lease a completed read round grants (read_mode = "lease"): this
/// node's own, or shorter when a peer promises less.
pub const LEASE_SECONDS: &str = "seqd_lease_seconds";
/// Snapshots handed to the transport for a follower, and installed here.
pub const SNAPSHOTS_SENT_TOTAL: &str = "seqd_raft_snapshots_sent_total";
/// Peer streams refused because their node came back with another data
/// directory (storage::identity).
pub const PEER_STREAMS_REFUSED_TOTAL: &str = "seqd_raft_peer_streams_refused_total";
pub const SNAPSHOTS_INSTALLED_TOTAL: &str = "seqd_raft_snapshots_installed_total";
/// Of those, the ones whose state went in as a table file RocksDB ingested
/// (a large snapshot), not through the write-ahead log.
pub const SNAPSHOTS_INGESTED_TOTAL: &str = "seqd_raft_snapshots_ingested_total";
/// The last snapshot built for followers: how long it took (on its own
/// thread, from a checkpoint) and its size.
pub const SNAPSHOT_BUILD_SECONDS: &str = "seqd_raft_snapshot_last_build_seconds";
pub const SNAPSHOT_BYTES: &str = "seqd_raft_snapshot_last_bytes";
/// Time the last snapshot sent in chunks took to reach its follower's
/// node, and the chunks received here.
pub const SNAPSHOT_SEND_SECONDS: &str = "seqd_raft_snapshot_last_send_seconds";
pub const SNAPSHOT_CHUNKS_RECEIVED_TOTAL: &str = "seqd_raft_snapshot_chunks_received_total";
/// Time the last snapshot installed here held the node loop.
pub const SNAPSHOT_INSTALL_SECONDS: &str = "seqd_raft_snapshot_last_install_seconds";
/// Raft messages dropped because they name another node as their receiver
/// (a peer reached this node at an address it holds for someone else).
pub const MISDIRECTED_MESSAGES_TOTAL: &str = "seqd_raft_misdirected_messages_total";
/// Keys held in the leader's memory.
pub const ACTIVE_KEYS: &str = "seqd_active_keys";
/// A leader's handover (a transfer, or SIGTERM): its phase (0 none, 1
/// releasing idle keys while serving, 2 trimming, not serving, 3
/// transferring), how long it has run, and the idle keys it proposed for
/// release so far.
pub const HANDOVER_PHASE: &str = "seqd_handover_phase";
pub const HANDOVER_SECONDS: &str = "seqd_handover_seconds";
pub const HANDOVER_KEYS_RELEASED: &str = "seqd_handover_keys_released";
/// Wall-clock steps back seen by the ID issuer, by `outcome`: `ridden`
/// (once per step: carried on the logical clock, or to a time still past
/// every stamp), or `refused` (once per call refused while the clock is
/// too far behind); and their size (once per step ridden, once per run of
/// refused calls).
pub const CLOCK_ROLLBACKS_TOTAL: &str = "seqd_clock_rollbacks_total";
pub const CLOCK_ROLLBACK_SECONDS: &str = "seqd_clock_rollback_seconds";
/// Wall-clock steps forward larger than `max_rollback_ms`, by `outcome`:
/// `held` (IDs and fences go on from before it), then `believed` (it held
/// for `trust_forward_step_ms`) or `undone` (the clock came back first).
pub const CLOCK_FORWARD_STEPS_TOTAL: &str = "seqd_clock_forward_steps_total";
/// How far each peer's clock is ahead of this node's (negative: behind),
/// by `peer` id, estimated from the stamps on the Raft frames it sends
/// (a follower hears only the leader; the leader hears every follower).
/// NaN while the peer's stream is down.
pub const PEER_CLOCK_OFFSET_SECONDS: &str = "seqd_peer_clock_offset_seconds";
/// How far this node's time is past the latest time fence another node
/// committed, when more than `max_ahead_of_cluster_ms` (0 otherwise): the
/// node then issues no IDs and renews no fence.
pub const CLOCK_AHEAD_OF_CLUSTER_SECONDS: &str = "seqd_clock_ahead_of_cluster_seconds";
/// How far this node's time fence is ahead of its clock.
pub const FENCE_HEADROOM_SECONDS: &str = "seqd_snowflake_fence_headroom_seconds";
/// Years before the Snowflake layout's time bits run out.
pub const LAYOUT_YEARS_LEFT: &str = "seqd_snowflake_layout_years_left";

/// Buckets fine enough to resolve sub-millisecond allocations.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global recorder and serves `/metrics` on `addr`. Must be
/// called inside a tokio runtime, once per process.
pub fn install(addr: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install()?;
    describe();
    zero_rare_counters();
    Ok(())
}

/// Counters of rare events exist from the start, at 0: a series that
/// appears only with its first event hides that event from `increase()`,
/// and an alert on any would miss it.
fn zero_rare_counters() {
    for outcome in ["ridden", "refused"] {
        metrics::counter!(CLOCK_ROLLBACKS_TOTAL, "outcome" => outcome).increment(0);
    }
    for outcome in ["held", "believed", "undone"] {
        metrics::counter!(CLOCK_FORWARD_STEPS_TOTAL, "outcome" => outcome).increment(0);
    }
    for name in [
        PEER_STREAMS_REFUSED_TOTAL,
        MISDIRECTED_MESSAGES_TOTAL,
        RAFT_LEADER_CHANGES_TOTAL,
        SNAPSHOTS_SENT_TOTAL,
        SNAPSHOTS_INSTALLED_TOTAL,
        SNAPSHOTS_INGESTED_TOTAL,
        SNAPSHOT_CHUNKS_RECEIVED_TOTAL,
        DENSE_UNANSWERED_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Latency of public calls, by op."
    );
    describe_counter!(REQUESTS_TOTAL, "Public calls, by op and gRPC code.");
    describe_counter!(
        DENSE_UNANSWERED_TOTAL,
        "Dense grants committed after their caller was gone (a hole unless retried with the same request id)."
    );
    describe_counter!(
        NEXT_STREAMS_TOTAL,
        "NextStream batch streams opened by clients."
    );
    describe_gauge!(NEXT_STREAMS_OPEN, "NextStream batch streams open now.");
    describe_gauge!(
        REQUEST_RECORDS_KEPT_SECONDS,
        Unit::Seconds,
        "How long the newest idempotency records dropped last had been kept, by records (served, applied)."
    );
    describe_counter!(ID_STREAMS_TOTAL, "NextIdsStream streams opened by clients.");
    describe_gauge!(ID_STREAMS_OPEN, "NextIdsStream streams open now.");
    describe_counter!(REFILLS_TOTAL, "Keys refilled ahead of demand.");
    describe_counter!(
        REFILL_WAITS_TOTAL,
        "Calls that waited for a refill to commit."
    );
    describe_counter!(
        IDLE_RELEASES_TOTAL,
        "Idle keys released through the log (applied) before leaving the leader's memory."
    );
    describe_gauge!(RAFT_TERM, "Current Raft term.");
    describe_gauge!(RAFT_IS_LEADER, "1 on the leader, 0 elsewhere.");
    describe_gauge!(RAFT_COMMIT_INDEX, "Raft commit index.");
    describe_gauge!(RAFT_APPLIED_INDEX, "Raft applied index.");
    describe_counter!(RAFT_PROPOSALS_TOTAL, "Entries proposed, by kind.");
    describe_counter!(
        RAFT_LEADER_CHANGES_TOTAL,
        "New leaders this node learned of."
    );
    describe_histogram!(
        RAFT_APPEND_SECONDS,
        Unit::Seconds,
        "Raft log write time (without the fsync, which the sync thread does)."
    );
    describe_histogram!(
        RAFT_SYNC_SECONDS,
        Unit::Seconds,
        "Raft log fsync time, one per batch of writes."
    );
    describe_gauge!(
        RAFT_SYNC_PENDING_SECONDS,
        Unit::Seconds,
        "Age of the oldest Raft log write waiting for its fsync (0: none)."
    );
    describe_counter!(
        RAFT_READ_ROUNDS_TOTAL,
        "ReadIndex leadership confirmations."
    );
    describe_counter!(
        RAFT_READ_RESENDS_TOTAL,
        "Read rounds sent to every follower again after the chosen ones answered slowly."
    );
    describe_histogram!(
        RAFT_READ_ROUND_SECONDS,
        Unit::Seconds,
        "Time from sending a ReadIndex round to its confirmation by a majority."
    );
    describe_counter!(
        LEASE_READS_TOTAL,
        "Calls answered under a leader lease, without a round (read_mode = lease)."
    );
    describe_gauge!(
        LEASE_SECONDS,
        "Lease a read round grants (lease mode): the shortest of this node's and its voters' vote promises, times 0.8."
    );
    describe_counter!(SNAPSHOTS_SENT_TOTAL, "Snapshots sent to followers.");
    describe_counter!(
        PEER_STREAMS_REFUSED_TOTAL,
        "Peer streams refused: their node came back with another data directory (it lost its Raft state), or issues Snowflake IDs under another layout."
    );
    describe_counter!(
        MISDIRECTED_MESSAGES_TOTAL,
        "Raft messages dropped: addressed to another node id (a peer holds a wrong address for some member)."
    );
    describe_counter!(
        SNAPSHOTS_INSTALLED_TOTAL,
        "Snapshots installed on this node."
    );
    describe_counter!(
        SNAPSHOTS_INGESTED_TOTAL,
        "Snapshots installed on this node whose state RocksDB ingested as a table file."
    );
    describe_gauge!(
        SNAPSHOT_BUILD_SECONDS,
        Unit::Seconds,
        "Time the last snapshot for followers took to build (off the node loop)."
    );
    describe_gauge!(
        SNAPSHOT_BYTES,
        Unit::Bytes,
        "Size of the last snapshot built for followers."
    );
    describe_gauge!(
        SNAPSHOT_SEND_SECONDS,
        Unit::Seconds,
        "Time the last snapshot sent in chunks took to reach its follower: from the first chunk until the follower's node held the whole message."
    );
    describe_counter!(
        SNAPSHOT_CHUNKS_RECEIVED_TOTAL,
        "Snapshot chunks received from the leader."
    );
    describe_gauge!(
        SNAPSHOT_INSTALL_SECONDS,
        Unit::Seconds,
        "Time the last snapshot installed here took (the node loop waits for it)."
    );
    describe_gauge!(ACTIVE_KEYS, "Keys held in the leader's memory.");
    describe_gauge!(
        HANDOVER_PHASE,
        "Handover phase: 0 none, 1 releasing (serving), 2 trimming (not serving), 3 transferring."
    );
    describe_gauge!(
        HANDOVER_SECONDS,
        Unit::Seconds,
        "How long the running handover has taken so far (0: none)."
    );
    describe_gauge!(
        HANDOVER_KEYS_RELEASED,
        "Idle keys the running handover proposed for release so far."
    );
    describe_counter!(CLOCK_ROLLBACKS_TOTAL, "Clock steps back, by outcome.");
    describe_counter!(
        CLOCK_FORWARD_STEPS_TOTAL,
        "Clock steps forward beyond max_rollback_ms, by outcome."
    );
    describe_histogram!(
        CLOCK_ROLLBACK_SECONDS,
        Unit::Seconds,
        "Size of clock steps back."
    );
    describe_gauge!(
        CLOCK_AHEAD_OF_CLUSTER_SECONDS,
        Unit::Seconds,
        "How far this node's time is past the cluster's fences, when too far (0 otherwise)."
    );
    describe_gauge!(
        PEER_CLOCK_OFFSET_SECONDS,
        Unit::Seconds,
        "How far each peer's clock is ahead of this node's, by peer id."
    );
    describe_gauge!(
        FENCE_HEADROOM_SECONDS,
        "Time fence headroom ahead of the next stamp (the clock, or the last stamp when ahead of it)."
    );
    describe_gauge!(LAYOUT_YEARS_LEFT, "Years left in the Snowflake layout.");
}
