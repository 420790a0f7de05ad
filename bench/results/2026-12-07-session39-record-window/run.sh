#!/usr/bin/env bash
# How long the leader keeps its idempotency records under load
# (seqd_request_records_kept_seconds{records="served"}): a 3-node loopback
# cluster (the session 37 script), NextBatch x50 and Next x1 for 20 s each
# at 256 callers, the gauge read from every node after each.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin=${BIN:-/var/cache/seqd-target-release/release}
gauge() {
    for p in 17201 17202 17203; do
        curl -s "http://127.0.0.1:$p/metrics" | grep '^seqd_request_records_kept_seconds' | sed "s/^/node :$p /" || true
    done
}
export -f gauge
"$here/../2026-12-07-session37-pipeline-depth/cluster.sh" bash -c "
  for w in batch next; do
    echo \"== \$w, 256 callers, 20 s\"
    $bin/seqbench --endpoints \$ENDPOINTS --workload \$w --callers 256 --seconds 20
    gauge
  done"
# The dense namespace (inbox): records of applied calls.
"$here/../2026-12-07-session37-pipeline-depth/cluster.sh" bash -c "
  for w in batch next; do
    echo \"== inbox \$w, 256 callers, 20 s\"
    $bin/seqbench --endpoints \$ENDPOINTS --namespace inbox --workload \$w --callers 256 --seconds 20
    gauge
  done"
