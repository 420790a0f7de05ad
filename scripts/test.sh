#!/usr/bin/env bash
# Runs every check and test seqd has, on a fresh machine too: installs what
# is missing first (scripts/setup.sh), then formatting, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings

echo "== cargo test"
# Integration tests start real clusters; one test at a time keeps the
# two-core machines this runs on from starving elections. (An environment
# variable, not --test-threads: the criterion bench, run once in test mode,
# takes no such flag.)
RUST_TEST_THREADS=1 cargo test --all-targets

# The comparison harness is its own workspace (no RocksDB); built from its
# directory so its .cargo/config.toml points etcd-client at the vendored
# protoc.
echo "== bench/: fmt, clippy, test"
(
    cd bench
    cargo fmt -- --check
    cargo clippy --all-targets --locked -- -D warnings
    cargo test --locked
)
