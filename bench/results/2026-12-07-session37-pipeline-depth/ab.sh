#!/usr/bin/env bash
# Alternated pairs: seqcompare on seqd-3node, Next x1 at 32 callers plus peaks at 256 and 512.
set -u
n=${PAIRS:-3}; out=${OUT:-rr}
mkdir -p $out
for i in $(seq $n); do
  for v in old new; do
    SEQD_BIN=/tmp/s37/ab/$v/seqd ./seqcompare --targets ${TARGETS:-seqd-3node} --workloads ${WL:-next} --peak-workloads ${PWL:-next} --seconds 3 --open-loop-seconds 2 --peak-seconds 3 ${EXTRA:-} --json $out/ab-$v-$i.json > $out/ab-$v-$i.txt 2>&1
    echo "$v $i done rc=$?"
  done
done
