#!/usr/bin/env bash
# A/B of seqd builds on one node: for each round, each build in turn gets a
# fresh data directory, a 1 s warm-up and a 4 s seqbench run; prints
# calls/s, p99 and the node's CPU µs per call (from /proc).
#
#   bench/ab-one-node.sh WORKLOAD NAMESPACE ROUNDS SEQBENCH SEQD...
#   bench/ab-one-node.sh next inbox 4 ./seqbench /tmp/a/seqd /tmp/b/seqd
set -euo pipefail
wl=$1 ns=$2 rounds=$3 bench=$(realpath "$4")
shift 4
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for _ in $(seq "$rounds"); do
  for bin in "$@"; do
    dir=$(mktemp -d)
    (cd "$dir" && exec "$bin" --listen 127.0.0.1:7100 >log 2>&1) &
    pid=$!
    sleep 1.5
    "$bench" --endpoints 127.0.0.1:7100 --workload "$wl" --namespace "$ns" --seconds 1 >/dev/null
    t0=$(cpu_ticks $pid)
    out=$("$bench" --endpoints 127.0.0.1:7100 --workload "$wl" --namespace "$ns" --seconds 4 | tail -1)
    t1=$(cpu_ticks $pid)
    calls=$(sed -E 's/.*calls\/s= *([0-9]+).*/\1/' <<<"$out")
    p99=$(sed -E 's/.*p99= *([0-9.]+)ms.*/\1/' <<<"$out")
    us=$(awk -v d=$((t1 - t0)) -v c="$calls" -v hz="$ticks" 'BEGIN { printf "%.2f", d / hz * 1e6 / (c * 4) }')
    echo "$bin calls/s $calls p99_ms $p99 cpu_us/call $us"
    kill $pid
    wait $pid 2>/dev/null || true
    rm -rf "$dir"
  done
done
