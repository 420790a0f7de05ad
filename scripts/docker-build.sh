#!/usr/bin/env bash
# Builds the seqd:local and seqd-prometheus:local images FROM scratch, from
# what is on this machine: the cargo-built binaries, the shared libraries
# they link (found with ldd), and Debian's prometheus.
#
#   scripts/docker-build.sh            # release build (cargo build --release)
#   SEQD_BIN_DIR=dir scripts/docker-build.sh   # use seqd and seqctl from dir
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="${SEQD_BIN_DIR:-}"
if [ -z "$bin_dir" ]; then
    cargo build --release --locked --bin seqd --bin seqctl
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
build="${SEQD_DOCKER_BUILD_DIR:-$(mktemp -d)}"
trap 'rm -rf "$build"' EXIT

# Copies a binary and every shared library it links into a root fs.
install_with_libs() {
    local bin="$1" root="$2" dest="$3"
    install -D -m 0755 "$bin" "$root$dest"
    # A library ldd cannot find would otherwise be left out silently, and
    # the image fail only when its container starts.
    if ldd "$bin" | grep "not found" >&2; then
        echo "docker-build: $bin links a library this machine lacks (above)" >&2
        exit 1
    fi
    # "libx.so => /path (addr)" lines and the loader's own "/path (addr)" line.
    ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}

# seqd
root="$build/seqd/rootfs"
mkdir -p "$root/tmp" "$root/data" "$root/etc/seqd"
install_with_libs "$bin_dir/seqd" "$root" /usr/local/bin/seqd
install_with_libs "$bin_dir/seqctl" "$root" /usr/local/bin/seqctl
cp raft-config/*.toml "$root/etc/seqd/"
cp Dockerfile "$build/seqd/Dockerfile"
docker build -q -t seqd:local "$build/seqd"

# prometheus
command -v prometheus >/dev/null || { echo "prometheus missing: run scripts/setup.sh" >&2; exit 1; }
root="$build/prometheus/rootfs"
mkdir -p "$root/tmp" "$root/prometheus" "$root/etc/prometheus"
install_with_libs "$(command -v prometheus)" "$root" /bin/prometheus
cp docker/prometheus.yml "$root/etc/prometheus/prometheus.yml"
cp docker/seqd-rules.yml "$root/etc/prometheus/seqd-rules.yml"
cp docker/prometheus.Dockerfile "$build/prometheus/Dockerfile"
docker build -q -t seqd-prometheus:local "$build/prometheus"
# Re-tagging leaves the previous images untagged: remove those of ours
# (labelled by the Dockerfiles), or a machine that builds them on every
# test run fills its disk.
docker image prune -f --filter label=org.seqd.built-by=docker-build.sh >/dev/null
echo "built seqd:local and seqd-prometheus:local"
