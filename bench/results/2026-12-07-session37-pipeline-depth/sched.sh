#!/usr/bin/env bash
bin=/var/cache/seqd-target-release/release
$bin/seqbench --endpoints $ENDPOINTS --workload next --callers ${CALLERS:-256} --seconds 8 > /tmp/s37/sched-bench.txt &
b=$!
sleep 3
perf sched record -a -o /tmp/s37/sched.data -- sleep 1.5 >/dev/null 2>&1
wait $b
cat /tmp/s37/sched-bench.txt
for p in $PIDS; do echo "pid $p: $(cat /proc/$p/cmdline | tr '\0' ' ' | grep -o 'node[0-9].toml')"; done
