#!/usr/bin/env bash
# Alternated pairs of seqcompare argument sets (A_ARGS vs B_ARGS), same seqd.
set -u
n=${PAIRS:-3}; out=${OUT:-rr}
mkdir -p $out
for i in $(seq $n); do
  for v in old new; do
    if [ $v = old ]; then args=${A_ARGS:-}; else args=${B_ARGS:-}; fi
    SEQD_BIN=/tmp/s37/ab/old/seqd ./seqcompare --targets ${TARGETS:-seqd-3node} --workloads ${WL:-next} --peak-workloads ${PWL:-next} --seconds 3 --open-loop-seconds 2 --peak-seconds 3 $args --json $out/ab-$v-$i.json > $out/ab-$v-$i.txt 2>&1
    echo "$v $i done rc=$?"
  done
done
