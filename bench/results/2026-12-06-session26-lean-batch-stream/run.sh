#!/bin/bash
# Alternated pairs: the harness built at HEAD (base) vs with the lean batch
# stream (new); the same seqd binary; fixed open-loop rates.
cd /tmp/s26/ab2
for i in 1 2 3 4 5; do
  order="base new"; [ $((i % 2)) = 0 ] && order="new base"
  for arm in $order; do
    for cfg in seqd-3node:batch:8000 seqd-1node:batch:8000 seqd-3node:next:30000; do
      IFS=: read t w rate <<< "$cfg"
      /tmp/s26/$arm/seqcompare --seqd-bin /tmp/s26/base/seqd --targets $t --workloads $w --seconds 3 --open-loop-rate $rate --open-loop-seconds 5 --no-peak --json $arm-$t-$w-$i.json > $arm-$t-$w-$i.log 2>&1
    done
  done
done
echo done
