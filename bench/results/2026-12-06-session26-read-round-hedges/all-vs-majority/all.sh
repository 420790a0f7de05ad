#!/bin/sh
# seqd with raft.read_round_peers = "all": edits the generated config, then runs seqd.
prev=""
for a in "$@"; do
  if [ "$prev" = "--config" ]; then
    grep -q read_round_peers "$a" || sed -i 's/^read_mode = \(.*\)$/read_mode = \1\nread_round_peers = "all"/' "$a"
  fi
  prev="$a"
done
exec /var/cache/seqd-target-release/release/seqd "$@"
