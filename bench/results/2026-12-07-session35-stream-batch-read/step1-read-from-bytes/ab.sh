#!/bin/bash
# alternated pairs: old seqd vs new seqd, the same (new) seqcompare
for i in 1 2 3; do
  for v in old new; do
    SEQD_BIN=$PWD/seqd-$v ./seqcompare-new --targets seqd-1node,seqd-3node --workloads batch,next --no-peak --seconds 4 --open-loop-seconds 3 --rounds 1 --json ab-$v-$i.json > ab-$v-$i.txt 2>&1
  done
done
echo done
