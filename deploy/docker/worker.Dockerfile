# syntax=docker/dockerfile:1
# loranull-worker image for GPU nodes: the build stage is NVIDIA's CUDA devel image (nvcc,
# cuBLAS, cuSOLVER, NCCL headers) running the README's `make` and `make cuda`; the runtime stage
# is the CUDA runtime image, which carries libcudart, cuBLAS(Lt), cuSOLVER and NCCL, plus the
# Ubuntu libraries the worker links. Non-root; the entrypoint maps env to flags.
#
#   docker build -f deploy/docker/worker.Dockerfile -t loranull/worker:dev .
#   docker run --gpus all -v /srv/models:/models:ro -v /srv/token:/run/secrets/loranull/worker-token:ro \
#     -e LORANULL_SERVER_URL=http://server:8080 -e LORANULL_RANKS=8 loranull/worker:dev
#
# CUDA 13.0 is what the GPU backend is developed with (nvcc 13.0, sm_90 for H100/H200);
# change CUDA_VERSION together with the node's driver (13.0 needs driver >= 580).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu22.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config \
      libopenblas-dev liblapacke-dev \
      libmicrohttpd-dev libjansson-dev libsqlite3-dev \
      libuv1-dev libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The README's targets: `make` builds the binaries (and, nvcc being on PATH, the CUDA backend);
# `make cuda` is named as well so the image fails to build if the GPU backend does not, and
# `make cuda-bin` links the worker with the CUDA backend (build/cuda/bin/loranull-worker).
RUN make -j"$(nproc)" NVCC=/usr/local/cuda/bin/nvcc CUDA_HOME=/usr/local/cuda \
 && make cuda cuda-bin NVCC=/usr/local/cuda/bin/nvcc CUDA_HOME=/usr/local/cuda \
 && test -x build/cuda/bin/loranull-worker

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The GPU libraries the CUDA backend links come with the runtime base image; fail the build
# here, not at the first job, if a base image lacks one.
RUN for lib in libcudart.so libcublas.so libcublasLt.so libcusolver.so libnccl.so.2; do \
      ldconfig -p | grep -q "$lib" || { echo "base image lacks $lib" >&2; exit 1; }; \
    done
# Runtime libraries of bin/loranull-worker besides CUDA's (tests/deploy checks this list
# against `ldd` of the CPU build), plus curl for diagnostics from inside the pod.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libmicrohttpd12 libjansson4 libsqlite3-0 libuv1 libcurl4 \
      libopenblas0 liblapacke libgomp1 \
      ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loranull \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loranull-worker --no-create-home \
      --shell /usr/sbin/nologin loranull \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/loranull-worker

COPY --from=build /src/build/cuda/bin/loranull-worker /usr/local/bin/loranull-worker
COPY --chmod=0755 deploy/docker/worker-entrypoint.sh /usr/local/bin/worker-entrypoint.sh

USER 10001:10001
ENV LORANULL_WORKER_BIN=/usr/local/bin/loranull-worker \
    LORANULL_MODELS_DIR=/models \
    LORANULL_WORK_DIR=/var/lib/loranull-worker \
    LORANULL_DEVICE=cuda:0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/loranull-worker
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/worker-entrypoint.sh", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/worker-entrypoint.sh"]
