#!/usr/bin/env bash
# 3-node cluster on loopback; seqbench next at 32 callers; read rounds per call.
set -euo pipefail
repo=/work/main
bin=/var/cache/seqd-target-release/release
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
endpoints=127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103
for i in 1 2 3; do
    sed -e "s/127.0.0.1:700\([123]\)/127.0.0.1:1710\1/g" -e "s|data_dir = .*|data_dir = \"$work/node$i\"|" \
        "$repo/raft-config/node$i.toml" > "$work/node$i.toml"
    [ -n "${LEASE:-}" ] && sed -i "s/^read_mode = .*/read_mode = \"lease\"/" "$work/node$i.toml"
    printf '\n[metrics]\nlisten = "127.0.0.1:1720%s"\n' "$i" >> "$work/node$i.toml"
    SEQD_LOG=warn "$bin/seqd" --config "$work/node$i.toml" > "$work/node$i.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 100); do
    "$bin/seqctl" --endpoints $endpoints status --json 2>/dev/null | grep -q '"role":"Leader"' && break; sleep 0.2
done
"$bin/seqbench" --endpoints $endpoints --workload next --seconds 2 >/dev/null
scrape() { for i in 1 2 3; do curl -s 127.0.0.1:1720$i/metrics | grep -E '^(seqd_raft_read_index_rounds_total|seqd_requests_total|seqd_raft_proposals_total|seqd_segment_refills_total|seqd_request_duration_seconds_count)' | sed "s/^/n$i /"; done; }
scrape > $work/before
ticks() { for p in "${pids[@]}"; do awk '{print $14+$15}' /proc/$p/stat; done | paste -sd' '; }
t0=$(ticks)
"$bin/seqbench" --endpoints $endpoints --workload next --seconds 5 ${EXTRA:-}; curl -s 127.0.0.1:17201/metrics | grep -v "^#" | cut -c1-150 | head -60
t1=$(ticks)
scrape > $work/after
echo "cpu ticks before: $t0 after: $t1"
paste $work/before $work/after | awk '{ if ($2 != $4) print $1, $3, $4 - $2 }' | grep -v ' 0$' | head -40
