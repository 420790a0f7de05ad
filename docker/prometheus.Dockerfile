# Prometheus from the machine's Debian package, FROM scratch like seqd
# (scripts/docker-build.sh assembles rootfs/). Elsewhere: prom/prometheus.
FROM scratch
LABEL org.seqd.built-by=docker-build.sh
COPY rootfs/ /
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=0.0.0.0:9090"]
