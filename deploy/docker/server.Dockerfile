# syntax=docker/dockerfile:1
# loranull-server image (the default, last stage) and a CPU-only worker image (target
# worker-cpu, for the cpu-dev overlay and machines without GPUs). The build stage runs the
# README's `make`; the runtime stages are Debian slim with only the shared libraries the
# binaries link (tests/deploy checks this list against the binaries), a non-root user, and the
# entrypoint script that maps env to flags.
#
#   docker build -f deploy/docker/server.Dockerfile -t loranull/server:dev .
#   docker build -f deploy/docker/server.Dockerfile --target worker-cpu -t loranull/worker-cpu:dev .
#   docker run -p 8080:8080 -v loranull-data:/var/lib/loranull loranull/server:dev

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config \
      libopenblas-dev liblapacke-dev \
      libmicrohttpd-dev libjansson-dev libsqlite3-dev \
      libuv1-dev libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The same target as the README's `make` (nvcc is absent here, so no CUDA backend).
RUN make -j"$(nproc)" && test -x bin/loranull-server && test -x bin/loranull-worker

FROM ${DEBIAN_IMAGE} AS runtime
# Runtime libraries of bin/loranull-server and bin/loranull-worker, plus curl (health check)
# and sqlite3 (online backups with `.backup`, see deploy/README.md). libjs-chart.js serves the
# dashboard's charts.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libmicrohttpd12 libjansson4 libsqlite3-0 libuv1 libcurl4 \
      libopenblas0 liblapacke libgomp1 \
      libjs-chart.js \
      ca-certificates curl sqlite3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loranull \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loranull --no-create-home \
      --shell /usr/sbin/nologin loranull \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/loranull /var/lib/loranull-worker

FROM runtime AS worker-cpu
COPY --from=build /src/bin/loranull-worker /usr/local/bin/loranull-worker
COPY --chmod=0755 deploy/docker/worker-entrypoint.sh /usr/local/bin/worker-entrypoint.sh
USER 10001:10001
ENV LORANULL_WORKER_BIN=/usr/local/bin/loranull-worker \
    LORANULL_MODELS_DIR=/models \
    LORANULL_WORK_DIR=/var/lib/loranull-worker \
    LORANULL_DEVICE=cpu
WORKDIR /var/lib/loranull-worker
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/worker-entrypoint.sh", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/worker-entrypoint.sh"]

FROM runtime AS server
COPY --from=build /src/bin/loranull-server /usr/local/bin/loranull-server
COPY migrations /usr/share/loranull/migrations
COPY server/static /usr/share/loranull/static
COPY --chmod=0755 deploy/docker/server-entrypoint.sh /usr/local/bin/server-entrypoint.sh

# Numeric user so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
ENV LORANULL_SERVER_BIN=/usr/local/bin/loranull-server \
    LORANULL_LISTEN=0.0.0.0:8080 \
    LORANULL_DATA_DIR=/var/lib/loranull \
    LORANULL_MIGRATIONS_DIR=/usr/share/loranull/migrations \
    LORANULL_STATIC_DIR=/usr/share/loranull/static
WORKDIR /var/lib/loranull
VOLUME ["/var/lib/loranull"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/server-entrypoint.sh", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/server-entrypoint.sh"]
