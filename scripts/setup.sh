#!/usr/bin/env bash
# Installs what building and testing seqd needs on a fresh Debian machine,
# plus any extra Debian packages named as arguments (scripts/compare.sh
# passes the systems it compares against).
# Idempotent: packages already present are left alone.
set -euo pipefail

# bindgen (RocksDB's bindings) needs libclang; RocksDB's C++ needs a C++ compiler.
# The metrics test runs a real Prometheus; the compose test runs the cluster
# in Docker (the engine itself comes with the machine); the nemesis puts
# nodes in network namespaces (iproute2's `ip`).
packages=(libclang-dev clang build-essential pkg-config librocksdb-dev prometheus docker-compose iproute2 "$@")

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "setup: system packages present"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi

if ! docker info >/dev/null 2>&1; then
    echo "setup: warning: no Docker engine answers; tests/compose.rs will fail" >&2
fi
