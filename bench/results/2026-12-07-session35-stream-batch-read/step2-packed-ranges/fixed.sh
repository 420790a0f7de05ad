#!/bin/bash
# The three-node NextBatch x50 half-load row at one fixed rate for both
# builds (20,000 calls/s, the old build's half load), three alternated pairs.
for i in 1 2 3; do
  for v in old new; do
    bin=$PWD/seqd-old; [ $v = new ] && bin=$PWD/seqd-packed
    SEQD_BIN=$bin ./seqcompare-packed --targets seqd-3node --workloads batch --no-peak --seconds 2 --open-loop-seconds 4 --open-loop-rate 20000 --rounds 1 --json fixed-$v-$i.json > fixed-$v-$i.txt 2>&1
  done
done
echo done
