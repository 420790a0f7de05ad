#!/bin/bash
# Three alternated pairs: d4bd4e3's seqd (old) against the packed-ranges
# build (new), driven by the same (new) seqcompare, whose client asks for
# packed ranges (the old node ignores the flag and names its keys).
for i in 1 2 3; do
  for v in old new; do
    bin=$PWD/seqd-old; [ $v = new ] && bin=$PWD/seqd-packed
    SEQD_BIN=$bin ./seqcompare-packed --targets seqd-1node,seqd-3node --workloads batch,next --no-peak --seconds 4 --open-loop-seconds 3 --rounds 1 --json ab-$v-$i.json > ab-$v-$i.txt 2>&1
  done
done
echo done
