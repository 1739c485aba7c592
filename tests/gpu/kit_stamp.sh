#!/usr/bin/env bash
# tests/gpu/kit_stamp.sh — one hash of every file the CUDA build's programs are made from (C, CUDA
# and header sources, the Makefile), by content and path: what kit.sh records and run.sh compares,
# so a kit is used only by the tree it was built from. Needs only coreutils.
set -euo pipefail
cd "$(dirname "$0")/../.."
find Makefile common proto server worker tests/gpu -type f \
    \( -name Makefile -o -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
