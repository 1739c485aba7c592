#!/usr/bin/env bash
# tests/gpu/kit.sh — make, on a machine without a GPU, everything tests/gpu/run.sh needs on a bare
# GPU machine, so that the device's few minutes go to tests and benchmarks, not to a build that may
# not even find its libraries there.
#
#   tests/gpu/kit.sh            # writes .gpukit/ (git-ignored), then, with the device tool:
#   run(command="OUT=$OUT tests/gpu/run.sh", carry=[".gpukit"], timeout_s=600)
#
# .gpukit/kit.tar.gz holds the CUDA build's programs (made here: same nvcc as the device's, sm_90)
# — build/cuda/tests/* and build/cuda/bin/* — and the shared libraries they load from this
# machine's system that a CUDA image may lack (OpenBLAS, LAPACK(E), gfortran, jansson, libmicrohttpd,
# SQLite, libuv, libcurl and theirs), but not glibc's own libraries nor the CUDA toolkit's (cuBLAS,
# cuSOLVER, NCCL: far too big to carry; run.sh finds the device's own). .gpukit/stamp is the hash
# of every source the programs are built from (tests/gpu/kit_stamp.sh): run.sh uses the kit only
# when the tree it runs in has the same hash, and otherwise builds as before, saying why.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
KIT=${GPUKIT:-.gpukit} # another folder for tests (run.sh reads the same variable)
make -j"$(nproc)" cuda cuda-bin > /dev/null
rm -rf "$KIT"
mkdir -p "$KIT/stage/tests" "$KIT/stage/bin" "$KIT/stage/lib"
cp -p build/cuda/tests/* "$KIT/stage/tests/"
cp -p build/cuda/bin/* "$KIT/stage/bin/"
# the programs' libraries, as the loader resolves them here; glibc's and the toolkit's stay behind
cuda_real=$(readlink -f "$CUDA_HOME")
for b in "$KIT"/stage/tests/* "$KIT"/stage/bin/*; do
    ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }'
done | sort -u | while read -r name path; do
    case $name in
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*|libresolv.so.*|libutil.so.*) continue ;;
    esac
    real=$(readlink -f "$path")
    case $real in "$cuda_real"/*|/usr/local/cuda*) continue ;; esac
    cp "$real" "$KIT/stage/lib/$name"
done
tests/gpu/kit_stamp.sh > "$KIT/stamp"
tar -C "$KIT/stage" -czf "$KIT/kit.tar.gz" tests bin lib
rm -rf "$KIT/stage"
echo "kit: $KIT/kit.tar.gz $(du -h "$KIT/kit.tar.gz" | cut -f1), stamp $(cat "$KIT/stamp")"
tar -tzf "$KIT/kit.tar.gz" | sed 's/^/  /'
