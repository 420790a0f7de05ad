#!/usr/bin/env bash
# Runs every check and test seqd has, on a fresh machine too: installs what
# is missing first (scripts/setup.sh), then formatting, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

# etcd-client (a dependency of bench/) runs the `protoc` on PATH at build
# time; bench/tools/protoc runs the one vendored from crates.io.
export PATH="$PWD/bench/tools:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (seqd and bench/)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The API docs' links must resolve (a public item's doc linking a private
# one reads as a dead link on docs.rs).
echo "== cargo doc (seqd, warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc -p seqd --no-deps --locked

# Frontends depend on the client alone; keep it building without the server.
echo "== cargo check: client library without the server feature"
cargo check -p seqd --lib --no-default-features --locked

echo "== cargo test (seqd and bench/)"
# Integration tests start real clusters; one test at a time keeps the
# two-core machines this runs on from starving elections. (An environment
# variable, not --test-threads: the criterion bench, run once in test mode,
# takes no such flag.)
RUST_TEST_THREADS=1 cargo test --workspace --all-targets --locked
