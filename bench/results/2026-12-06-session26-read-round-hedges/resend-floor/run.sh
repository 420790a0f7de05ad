#!/bin/bash
# Alternated pairs: read-round resend floor 2 ms (base) vs 0.5 ms (resend05),
# three nodes, read_round_peers = majority (the default), fixed open-loop rates.
cd /tmp/s26/ab3
C=/var/cache/seqd-target-release/release/seqcompare
for i in 1 2 3 4 5; do
  order="base resend05"; [ $((i % 2)) = 0 ] && order="resend05 base"
  for arm in $order; do
    bin=/tmp/s26/base/seqd; [ $arm = resend05 ] && bin=/tmp/s26/seqd-resend05
    for w in batch:10000 next:30000; do
      wl=${w%%:*}; rate=${w##*:}
      $C --seqd-bin $bin --targets seqd-3node --workloads $wl --seconds 3 --open-loop-rate $rate --open-loop-seconds 5 --no-peak --json $arm-$wl-$i.json > $arm-$wl-$i.log 2>&1
    done
  done
done
echo done
