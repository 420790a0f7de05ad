#!/usr/bin/env bash
# Compares seqd with Redis INCR and an etcd compare-and-swap counter on this
# machine: installs what is missing, builds seqd (release) and the bench
# crate, then runs `seqcompare` with any arguments given here, e.g.
#
#   ./scripts/compare.sh                          # everything: about 8.5 minutes with
#                                                 # a cold build, 3.3 with a warm one
#   ./scripts/compare.sh --seconds 2 --workloads next,batch --dist zipf
#   ./scripts/compare.sh --help
#
# Results: a table on stdout and bench-results.json in the current directory
# (--json FILE to change). The targets run on free loopback ports in fresh
# temporary directories, never in the repository. See bench/README.md.
#
# Environment:
#   SEQD_BIN         seqd binary to benchmark (default: the release build below)
#   SKIP_SEQD_BUILD  1: do not build seqd, use SEQD_BIN as it is
# Idempotent: installed packages and up-to-date builds are left alone.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
caller_dir="$PWD"
release_target=/var/cache/seqd-target-release

# The compared systems come from Debian. apt may start their system
# services; seqcompare runs its own instances on other ports, so those do not
# interfere.
"$repo/scripts/setup.sh" redis-server etcd-server

# One cargo run builds both: bench/ is a member of seqd's workspace, so the
# dependencies they share compile once.
cd "$repo"
# etcd-client (a dependency of bench/) runs the `protoc` on PATH at build
# time; bench/tools/protoc runs the one vendored from crates.io.
export PATH="$PWD/bench/tools:$PATH"
if [ "${SKIP_SEQD_BUILD:-0}" != 1 ]; then
    echo "compare: building seqd and seqcompare (release; 3-4 minutes the first time on two cores)"
    CARGO_TARGET_DIR="$release_target" cargo build --release --locked -p seqd --bin seqd -p seqd-bench --bin seqcompare
else
    echo "compare: building seqcompare (release)"
    CARGO_TARGET_DIR="$release_target" cargo build --release --locked -p seqd-bench --bin seqcompare
fi
export SEQD_BIN="${SEQD_BIN:-$release_target/release/seqd}"

cd "$caller_dir"
exec "$release_target/release/seqcompare" "$@"
