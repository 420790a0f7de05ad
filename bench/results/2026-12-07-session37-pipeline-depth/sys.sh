#!/usr/bin/env bash
bin=/var/cache/seqd-target-release/release
$bin/seqbench --endpoints $ENDPOINTS --workload next --callers ${CALLERS:-256} --seconds 8 > /tmp/s37/sys-bench.txt &
b=$!
sleep 3
leader=$(for i in 1 2 3; do curl -s 127.0.0.1:1720$i/metrics | grep -q '^seqd_raft_is_leader 1' && echo $i; done)
lp=$(echo $PIDS | cut -d' ' -f$leader)
r0=$(curl -s 127.0.0.1:1720$leader/metrics | grep '^seqd_raft_read_index_rounds_total' | cut -d' ' -f2)
c0=$(curl -s 127.0.0.1:1720$leader/metrics | grep '^seqd_request_duration_seconds_count{op="NextBatch"' | cut -d' ' -f2)
timeout -s INT 2 perf trace -s -p $lp -o /tmp/s37/sys-trace.txt >/dev/null 2>&1
r1=$(curl -s 127.0.0.1:1720$leader/metrics | grep '^seqd_raft_read_index_rounds_total' | cut -d' ' -f2)
c1=$(curl -s 127.0.0.1:1720$leader/metrics | grep '^seqd_request_duration_seconds_count{op="NextBatch"' | cut -d' ' -f2)
wait $b
cat /tmp/s37/sys-bench.txt
echo "leader $leader rounds $((r1-r0)) batches $((c1-c0))"
