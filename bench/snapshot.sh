#!/usr/bin/env bash
# How a large state reaches a follower the log was compacted past: the
# leader builds a snapshot (on a thread of its own, from a checkpoint),
# sends it in 1 MiB chunks on a call beside the Raft stream, and the
# follower installs it on its loop (from session 32, a snapshot of 1 MiB
# or more as a table file RocksDB ingests).
#
#   bench/snapshot.sh                 # a million keys
#   bench/snapshot.sh 28000000        # twenty-eight million (past the 512
#                                     # MiB one gRPC message held until
#                                     # session 31)
#   SEQD_SNAPSHOT_PERF=/tmp/snap.data bench/snapshot.sh 3000000
#                                     # also perf-record the follower (call
#                                     # graphs) from its start until it
#                                     # caught up
#   SEQD_SNAPSHOT_PERF_LEADER=/tmp/lead.data bench/snapshot.sh 3000000
#                                     # the same of the leader (its build
#                                     # and send)
#   SEQD_SNAPSHOT_LOGS=/tmp/logs bench/snapshot.sh 3000000
#                                     # keep the nodes' logs there
#
# Starts a three-node cluster of the release build on loopback (ports
# 17301-17303, metrics 17401-17403) in a temporary directory, stops one
# follower, fills the other two with seqbench (NextBatch of 1,000 new keys
# from 4 callers, until about KEYS keys are used), starts the follower
# again and waits until it installed a snapshot and applied what the
# leader had committed. Prints the snapshot's size and its build, send and
# install times (the nodes' gauges), the follower's catch-up time, each
# node's peak resident memory, and whether leadership stayed put.
# Builds seqd, seqbench and seqctl (release) first if needed.
set -euo pipefail

keys="${1:-1000000}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-/var/cache/seqd-target-release}"
export PATH="$repo/bench/tools:$PATH"
(cd "$repo" && CARGO_TARGET_DIR="$target" cargo build --release --locked -q \
    -p seqd --bin seqd --bin seqbench --bin seqctl)
bin="$target/release"
work="$(mktemp -d)"
pids=(0 0 0 0)
perf_pid=0
leader_perf_pid=0
cleanup() {
    [ "$perf_pid" = 0 ] || kill -INT "$perf_pid" 2>/dev/null || true
    [ "$leader_perf_pid" = 0 ] || kill -INT "$leader_perf_pid" 2>/dev/null || true
    for p in "${pids[@]}"; do [ "$p" != 0 ] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${SEQD_SNAPSHOT_LOGS:-}" ]; then
        mkdir -p "$SEQD_SNAPSHOT_LOGS" && cp "$work"/node*.log "$SEQD_SNAPSHOT_LOGS"/ || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

endpoints=127.0.0.1:17301,127.0.0.1:17302,127.0.0.1:17303
start() {
    SEQD_LOG=info "$bin/seqd" --config "$work/node$1.toml" >> "$work/node$1.log" 2>&1 &
    pids[$1]=$!
}
for i in 1 2 3; do
    sed -e "s/127.0.0.1:700\([123]\)/127.0.0.1:1730\1/g" \
        -e "s|data_dir = .*|data_dir = \"$work/node$i\"|" \
        -e "s/compact_threshold = .*/compact_threshold = 20/" \
        "$repo/raft-config/node$i.toml" > "$work/node$i.toml"
    printf '\n[metrics]\nlisten = "127.0.0.1:1740%s"\n' "$i" >> "$work/node$i.toml"
    start "$i"
done

seqctl() { "$bin/seqctl" --endpoints "$endpoints" "$@"; }
field() { # node field: one node's field from seqctl status --json
    seqctl status --json 2>/dev/null | python3 -c "
import json, sys
n = [n for n in json.load(sys.stdin)['nodes'] if n.get('id') == $1]
print(n[0].get('$2', '') if n else '')"
}
leader=""
for _ in $(seq 100); do
    leader=$(seqctl status --json 2>/dev/null | python3 -c '
import json, sys
print(next((n["id"] for n in json.load(sys.stdin)["nodes"] if n.get("role") == "Leader"), ""))' || true)
    [ -n "$leader" ] && break
    sleep 0.2
done
[ -n "$leader" ] || { echo "no leader"; exit 1; }
follower=$((leader % 3 + 1))
term=$(field "$leader" term)
kill "${pids[$follower]}"
wait "${pids[$follower]}" 2>/dev/null || true
pids[$follower]=0

per_call=1000
echo "snapshot: node $follower stopped; filling about $keys keys (NextBatch of $per_call)"
# Drawn from a hundred times as many: nearly every key a call picks is new,
# so the fill makes about KEYS calls' worth of keys in one pass.
"$bin/seqbench" --endpoints "$endpoints" --workload batch --fanout "$per_call" \
    --keys $((keys * 100)) --calls $((keys / per_call)) --callers 4 \
    | grep -E "calls/s|errors" || true
commit=$(field "$leader" commit_index)
[ -n "$commit" ] || { echo "snapshot: the leader did not answer"; exit 1; }

echo "snapshot: starting node $follower again (leader $leader at commit $commit)"
started=$(date +%s.%N)
start "$follower"
if [ -n "${SEQD_SNAPSHOT_PERF:-}" ]; then
    perf record -F 499 -g -p "${pids[$follower]}" -o "$SEQD_SNAPSHOT_PERF" \
        > "$work/perf.txt" 2>&1 &
    perf_pid=$!
fi
if [ -n "${SEQD_SNAPSHOT_PERF_LEADER:-}" ]; then
    perf record -F 499 -g -p "${pids[$leader]}" -o "$SEQD_SNAPSHOT_PERF_LEADER" \
        > "$work/perf-leader.txt" 2>&1 &
    leader_perf_pid=$!
fi
caught=""
deadline=$(($(date +%s) + 1800))
while [ "$(date +%s)" -lt "$deadline" ]; do
    applied=$(field "$follower" applied_index || true)
    if [ -n "$applied" ] && [ "$applied" -ge "$commit" ]; then
        caught=$(echo "$(date +%s.%N) - $started" | bc | xargs printf "%.1f")
        break
    fi
    sleep 0.2
done
if [ -n "${SEQD_SNAPSHOT_PERF:-}" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    perf_pid=0
fi
if [ -n "${SEQD_SNAPSHOT_PERF_LEADER:-}" ]; then
    kill -INT "$leader_perf_pid" 2>/dev/null || true
    wait "$leader_perf_pid" 2>/dev/null || true
    leader_perf_pid=0
fi
grep -q "installed snapshot" "$work/node$follower.log" \
    || echo "snapshot: node $follower caught up without one (from the log)"
metric() { # port name
    curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}
lm=$((17400 + leader))
fm=$((17400 + follower))
echo
echo "keys:      $(metric "$lm" seqd_active_keys) held by the leader"
echo "snapshot:  $(metric "$lm" seqd_raft_snapshot_last_bytes) bytes," \
    "built in $(metric "$lm" seqd_raft_snapshot_last_build_seconds) s," \
    "sent in $(metric "$lm" seqd_raft_snapshot_last_send_seconds) s" \
    "($(metric "$fm" seqd_raft_snapshot_chunks_received_total) chunks)," \
    "installed in $(metric "$fm" seqd_raft_snapshot_last_install_seconds) s"
echo "follower:  ${caught:-not} caught up (s from its start);" \
    "snapshots built: $(grep "snapshot built for followers" "$work/node$leader.log" \
        | grep -vc dropped || true)"
for i in 1 2 3; do
    [ "${pids[$i]}" != 0 ] || continue
    echo "node $i:    peak RSS $(awk '/VmHWM/ { print $2, $3 }' "/proc/${pids[$i]}/status")"
done
echo "term:      $term before, $(field "$leader" term) after (leader $leader:" \
    "$(field "$leader" role))"
# How the snapshot went, from the two nodes' logs (a send that failed, a
# second build, an election).
echo "log:"
grep -hE "snapshot (built|sent|not sent)|sending a snapshot failed|became leader|installed snapshot" \
    "$work/node$leader.log" "$work/node$follower.log" 2>/dev/null \
    | sed -e 's/\x1b\[[0-9;]*m//g' | sort | cut -c1-220 | sed 's/^/  /' || true
[ -n "$caught" ] && grep -q "installed snapshot" "$work/node$follower.log"
