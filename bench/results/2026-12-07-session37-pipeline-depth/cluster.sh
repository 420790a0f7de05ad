#!/usr/bin/env bash
# Starts a 3-node cluster on loopback (ports 1710x, metrics 1720x), runs "$@" against it, stops it.
set -euo pipefail
repo=/work/main
bin=${BIN:-/var/cache/seqd-target-release/release}
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export ENDPOINTS=127.0.0.1:17101,127.0.0.1:17102,127.0.0.1:17103
for i in 1 2 3; do
    sed -e "s/127.0.0.1:700\([123]\)/127.0.0.1:1710\1/g" -e "s|data_dir = .*|data_dir = \"$work/node$i\"|" \
        "$repo/raft-config/node$i.toml" > "$work/node$i.toml"
    [ -n "${LEASE:-}" ] && sed -i "s/^read_mode = .*/read_mode = \"lease\"/" "$work/node$i.toml"
    printf '\n[metrics]\nlisten = "127.0.0.1:1720%s"\n' "$i" >> "$work/node$i.toml"
    SEQD_LOG=warn "$bin/seqd" --config "$work/node$i.toml" > "$work/node$i.log" 2>&1 &
    pids+=($!)
done
export PIDS="${pids[*]}"
for _ in $(seq 100); do
    "$bin/seqctl" --endpoints $ENDPOINTS status --json 2>/dev/null | grep -q '"role":"Leader"' && break; sleep 0.2
done
"$bin/seqbench" --endpoints $ENDPOINTS --workload next --seconds 2 >/dev/null
"$@"
