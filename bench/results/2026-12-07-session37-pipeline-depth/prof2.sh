#!/usr/bin/env bash
bin=/var/cache/seqd-target-release/release
callers=${CALLERS:-32}
$bin/seqbench --endpoints $ENDPOINTS --workload ${WL:-next} --callers $callers --seconds 8 &
b=$!
sleep 2
scrape() { for i in 1 2 3; do curl -s 127.0.0.1:1720$i/metrics | grep -E '^seqd_raft_read_index_round_seconds_(sum|count)|^seqd_request_duration_seconds_(sum|count)|^seqd_raft_read_index_round_seconds_bucket|^seqd_request_duration_seconds_bucket\{op="NextBatch' | sed "s/^/n$i /"; done; }
scrape > /tmp/s37/m0; sleep 4; scrape > /tmp/s37/m1
paste /tmp/s37/m0 /tmp/s37/m1 | awk '{ d=$6-$3; if (d != 0) print $1, $2, d }'
wait $b
