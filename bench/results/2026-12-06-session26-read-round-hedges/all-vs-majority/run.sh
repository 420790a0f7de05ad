#!/bin/bash
# Alternated pairs: majority (the default) vs all, three nodes, fixed open-loop rates.
R=/var/cache/seqd-target-release/release
cd /tmp/s26/ab
for i in 1 2 3 4 5 6; do
  order="maj all"; [ $((i % 2)) = 0 ] && order="all maj"
  for arm in $order; do
    bin=$R/seqd; [ $arm = all ] && bin=/tmp/s26/ab/all.sh
    for w in next:30000 batch:10000; do
      wl=${w%%:*}; rate=${w##*:}
      SEQD_BIN=$bin $R/seqcompare --targets seqd-3node --workloads $wl --seconds 3 --open-loop-rate $rate --open-loop-seconds 5 --no-peak --json $arm-$wl-$i.json > $arm-$wl-$i.log 2>&1
    done
  done
done
echo done
