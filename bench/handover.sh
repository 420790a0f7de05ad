#!/usr/bin/env bash
# How long a leadership handover takes when the leader holds many active
# keys: the leader first trims every key it holds (commits each key's exact
# position, in parts of 10,000 keys), then transfers. Nothing is served
# meanwhile, so this is also the gap a rolling restart makes per leader.
#
#   bench/handover.sh                 # a million keys
#   bench/handover.sh 3000000         # three million
#   SEQD_HANDOVER_PERF=/tmp/ho.data bench/handover.sh   # also perf-record the
#                                     # old leader (call graphs, 30 s) from
#                                     # the transfer on
#
# Starts a three-node cluster of the release build on loopback (ports
# 17101-17103, metrics 17201-17203) in a temporary directory, fills it with
# seqbench (NextBatch of 1,000 keys, until about KEYS keys are in use), then
# runs `seqctl transfer-leader` while 4 callers keep calling `Next`, and
# prints:
#   - the release phase's windows of idle keys and the longest loop round
#     spent gathering and sorting them (the old leader's loop does it);
#   - the trim: keys and parts (the old leader's log) and how long from the
#     trim's start to the new leader serving (the two nodes' logs);
#   - how long seqctl waited;
#   - the callers' slowest call (the client retries meanwhile) and errors.
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
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

endpoints=127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103
for i in 1 2 3; do
    sed -e "s/127.0.0.1:700\([123]\)/127.0.0.1:1710\1/g" \
        -e "s|data_dir = .*|data_dir = \"$work/node$i\"|" \
        "$repo/raft-config/node$i.toml" > "$work/node$i.toml"
    printf '\n[metrics]\nlisten = "127.0.0.1:1720%s"\n' "$i" >> "$work/node$i.toml"
    SEQD_LOG=info "$bin/seqd" --config "$work/node$i.toml" > "$work/node$i.log" 2>&1 &
    pids+=($!)
done

seqctl() { "$bin/seqctl" --endpoints "$endpoints" "$@"; }
for _ in $(seq 100); do
    seqctl status --json 2>/dev/null | grep -q '"role":"Leader"' && break
    sleep 0.2
done
seqctl status

per_call=1000
echo "handover: filling about $keys keys (NextBatch of $per_call)"
"$bin/seqbench" --endpoints "$endpoints" --workload batch --fanout "$per_call" \
    --keys "$keys" --calls $((keys * 5 / per_call)) --callers 4 \
    | grep -E "calls/s|errors" || true

echo "handover: transferring under a load of 4 callers"
"$bin/seqbench" --endpoints "$endpoints" --workload next --callers 4 \
    --keys 1000 --seconds 30 > "$work/load.txt" 2>&1 &
load=$!
sleep 5
if [ -n "${SEQD_HANDOVER_PERF:-}" ]; then
    leader=$(seqctl status --json | python3 -c '
import json, sys
print(next(n["id"] for n in json.load(sys.stdin)["nodes"] if n.get("role") == "Leader"))')
    perf record -F 499 -g -p "${pids[$((leader - 1))]}" -o "$SEQD_HANDOVER_PERF" \
        -- sleep 30 > "$work/perf.txt" 2>&1 &
    sleep 0.5
fi
started=$(date +%s.%N)
seqctl transfer-leader
waited=$(echo "$(date +%s.%N) - $started" | bc)
wait "$load" || true

trim_line=$(grep -h "handing over: trimming" "$work"/node*.log | tail -1)
trim_at=$(echo "$trim_line" | cut -d' ' -f1)
serving_line=$(grep -h "leader serving" "$work"/node*.log | sort | tail -1)
serving_at=$(echo "$serving_line" | cut -d' ' -f1)
echo
# One line per window of idle keys the release phase gathered and sorted.
grep -h "next window of idle keys" "$work"/node*.log | python3 -c '
import re, sys
took = [int(m.group(1)) for m in map(re.compile(r"slowest_round_ms=(\d+)").search, sys.stdin) if m]
if took:
    print(f"release:  {len(took)} windows of idle keys; the slowest loop round gathering one took {max(took)} ms")
'
echo "trim:     ${trim_line#*trimming }"
echo "          started $trim_at, new leader serving $serving_at" \
    "($(python3 -c "from datetime import datetime as d; f=lambda s: d.fromisoformat(s.rstrip('Z')); print(round((f('$serving_at')-f('$trim_at')).total_seconds(), 3))") s)"
echo "seqctl:   transfer-leader returned after $waited s"
echo "callers:  $(grep -E "calls/s|max|errors" "$work/load.txt" | tr '\n' ' ')"
