#!/usr/bin/env bash
# One seqd node; seqbench old/new alternated; generator CPU (task-clock) per call.
set -u
dir=$(mktemp -d); (cd $dir && exec /tmp/s37/ab/old/seqd --listen 127.0.0.1:7100 >log 2>&1) & pid=$!
sleep 1.5
/tmp/s37/seqbench-new --endpoints 127.0.0.1:7100 --workload batch --seconds 2 >/dev/null
for i in $(seq ${PAIRS:-4}); do
 for wl in ${WLS:-batch next}; do
  for v in old new; do
    out=$(perf stat -x, -e task-clock -o /tmp/s37/ts.$v /tmp/s37/seqbench-$v --endpoints 127.0.0.1:7100 --workload $wl --seconds 4 | tail -1)
    ms=$(grep task-clock /tmp/s37/ts.$v | cut -d, -f1)
    calls=$(sed -E 's/.*calls\/s= *([0-9]+).*/\1/' <<<"$out")
    p99=$(sed -E 's/.*p99= *([0-9.]+)ms.*/\1/' <<<"$out")
    awk -v v=$v -v wl=$wl -v ms=$ms -v c=$calls -v p=$p99 'BEGIN{printf "%s %s calls/s %d p99 %s gen_us/call %.2f\n", wl, v, c, p, ms*1000/(c*4)}'
  done
 done
done
kill $pid; wait $pid 2>/dev/null; rm -rf $dir
