# seqd as a FROM-scratch image: the seqd and seqctl binaries and the shared
# libraries they link, nothing else (no image can be pulled where seqd is
# built and tested). scripts/docker-build.sh assembles the build context:
# this file plus rootfs/ (binaries, libraries, the raft-config files).
#
# Elsewhere, with public images, a two-stage build works the same way:
#   FROM rust:1-bookworm AS build   (scripts/setup.sh; cargo build --release)
#   FROM debian:bookworm-slim       (apt-get install librocksdb7.8; COPY the two binaries to /usr/local/bin)
FROM scratch
LABEL org.seqd.built-by=docker-build.sh
COPY rootfs/ /
VOLUME ["/data"]
EXPOSE 7001 7002 7003 9100
ENV SEQD_DATA_DIR=/data
ENTRYPOINT ["/usr/local/bin/seqd"]
