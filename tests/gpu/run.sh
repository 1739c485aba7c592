#!/usr/bin/env bash
# tests/gpu/run.sh — build, test and benchmark the CUDA backend on one GPU machine, in one script
# sized for a ~9-minute device window (one H200).
#
#   tests/gpu/run.sh [--dry-run] [GROUP...]
#
# GROUPs, in the order they run (default: all of these):
#   build   make -j$(nproc) cuda: the backend, the GPU tests and the benchmark (needs only the
#           engine's and common/'s libraries) — or, when .gpukit/ (tests/gpu/kit.sh, made on a
#           machine without a GPU and carried) matches this tree, the kit's programs, nothing built
#           (NO_KIT=1 builds anyway); a library the device lacks comes from the kit
#   tests   test_attention (fused flash kernels vs chunked vs CPU), test_kernels, test_solver,
#           test_calibrate (device covariances), test_model (whole engine), test_nccl (every
#           collective, device/managed/host buffers), test_nccl_procs (2 processes: skips under 2
#           GPUs), test_tp_nccl (ln_tp_train_rank on a 1-rank NCCL group vs ln_train),
#           test_memplan_gpu (the GPU memory plan's parts vs the bytes the engine allocates),
#           test_hooks (the engine's freeze/thaw/check hooks: bf16 copies, a refused GEMM reported)
#   gang    gang_gpu.py: two CUDA workers, one GPU each, train one 2-rank job over NCCL through the
#           server's rendezvous (skips at once, saying so, under 2 GPUs: on one H200 it costs ~0 s)
#   bench   bench_gpu peak (bf16 GEMM peak) and train (LLaMA-3-8B shapes, seq 2048, LoRA-Null-v2
#           r=128 on all seven targets: tokens/s, MFU against that peak)
#   peft    the same step in transformers + PEFT on the same GPU (bench_peft.py; the ratio)
#   cli     make cuda-bin, then `loranull train --device cuda` vs --device cpu (cli_train.sh)
#   calib   bench_gpu calib: whole-model calibration, 256 × 1024 tokens, device covariances
#   init    bench_gpu init (one 8B layer's LoRA-Null init, ×32) and the torch recipe on the same
#           GPU (bench_init_torch.py)
#   bench-extra (never by default): the train step with recomputation, and with fp32 weights
# --dry-run (or DRY_RUN=1): the build steps run for real; every GPU step is reported SKIP with the
#   reason and what it would run — what a machine without a GPU can check of this script.
#
# Results go to ${OUT:-tests/gpu/out}: environment.txt, one log per step, bench_*.json,
# summary.txt (one line per step: PASS / FAIL / SKIP / TIMEOUT / NOTRUN, wall seconds, rc, and for
# a skip its reason), bench_summary.{txt,json} (issue 7's numbers side by side: bench_report.py).
# summary.txt grows as steps end and the report is written on exit, also after a failure or a
# SIGTERM, so a run cut short still returns what it measured.
# Time: every step runs under `timeout` with the limit below (LIMIT_<STEP>=seconds overrides,
# e.g. LIMIT_BENCH_CALIB=200); the whole keeps to DEADLINE seconds (default 540: 9 minutes) — a step
# gets at most the time left, and one that no longer fits is NOTRUN. Expected on an H200: build
# ~1 min (-j16; each .cu file takes ~6 s of nvcc), tests ~1.5 min (the NCCL ones ~20 s), bench + peft ~2.5 min, cli
# ~0.5 min, calib ~1.5 min, init ~1.5 min. BENCH_CALIB_SAMPLES (256; 64 when under 150 s are
# left) and BENCH_STEPS (3) trade accuracy for time.
# Needs: the CUDA toolkit (nvcc, cuBLAS, cuSOLVER, NCCL) and what `make` needs for engine+common
# (OpenBLAS, LAPACKE, jansson); cli also the server's libraries. Optional: python3 with torch (CUDA),
# transformers and peft (skipped, visibly, when missing). No network.
# Exit status: 0 when nothing FAILed, TIMEd OUT or was NOTRUN (skips allowed), else 1.
set -u
cd "$(dirname "$0")/../.." || exit 1
DRY=${DRY_RUN:-0}
WANT=()
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//; /^set -u/d'; exit 0 ;;
        build|tests|gang|bench|peft|cli|calib|init|bench-extra) WANT+=("$a") ;;
        *) echo "run.sh: unknown group or option \"$a\" (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#WANT[@]} -eq 0 ] && WANT=(build tests gang bench peft cli calib init)
OUT=${OUT:-tests/gpu/out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
JOBS=$(nproc 2> /dev/null || echo 4)
DEADLINE=${DEADLINE:-540}
RESERVE=15 # kept for the report at the end
START=$SECONDS
FAILED=0
# python with torch: $PYTHON, else the machine's python3 (the device image's has CUDA torch; a
# .venv made on a machine without a GPU may hold a torch built for another CUDA); .venv only in a dry run
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
BIN=build/cuda/tests

want() { case " ${WANT[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

record() { # VERDICT NAME SECONDS DETAIL
    printf '%-8s %-17s %4ds  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"
}

# run_step KIND NAME LIMIT COMMAND...: KIND gpu (skipped in a dry run) or host (always runs).
# Runs COMMAND under timeout, its output in $OUT/NAME.log; exit 77 is a skip (the first line
# starting SKIP says why), 124/137 a timeout. Returns COMMAND's status.
run_step() {
    local kind=$1 name=$2 limit=$3 var
    shift 3
    var="LIMIT_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    limit=${!var:-$limit}
    if [ "$DRY" = 1 ] && [ "$kind" = gpu ]; then
        record SKIP "$name" 0 "dry run: would run \`$*\` under ${limit}s"
        return 77
    fi
    local left=$((DEADLINE - (SECONDS - START) - RESERVE))
    if [ "$left" -lt 10 ]; then
        record NOTRUN "$name" 0 "the ${DEADLINE}s deadline leaves no time"
        FAILED=1
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS rc verdict detail
    echo "==> $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    detail="rc=$rc"
    case $rc in
        0) verdict=PASS ;;
        77) verdict=SKIP; detail="rc=77 — $(grep -m1 '^SKIP' "$OUT/$name.log" | cut -c1-200)" ;;
        124|137) verdict=TIMEOUT; detail="rc=$rc (limit ${limit}s)"; FAILED=1 ;;
        *) verdict=FAIL; FAILED=1 ;;
    esac
    record "$verdict" "$name" $((SECONDS - t0)) "$detail"
    if [ "$verdict" = FAIL ] || [ "$verdict" = TIMEOUT ]; then
        echo "---- last lines of $OUT/$name.log ----"
        tail -n 25 "$OUT/$name.log"
        echo "----"
    else
        grep -E '^(FAIL|PASS)' "$OUT/$name.log" | head -n 40 || true
    fi
    return $rc
}

finish() {
    trap - EXIT TERM INT
    if [ -f tests/gpu/bench_report.py ] && command -v "$PY" > /dev/null; then
        "$PY" tests/gpu/bench_report.py "$OUT" > "$OUT/report.log" 2>&1 || echo "bench_report.py failed: see $OUT/report.log"
    fi
    echo "==== summary ($OUT/summary.txt), $((SECONDS - START))s in all"
    cat "$SUMMARY"
    [ -f "$OUT/bench_summary.txt" ] && { echo "==== benchmark ($OUT/bench_summary.txt)"; cat "$OUT/bench_summary.txt"; }
    exit "$FAILED"
}
trap finish EXIT
trap 'record KILLED run.sh $((SECONDS - START)) "a signal ended the script"; FAILED=1; exit 1' TERM INT

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
    echo "mode: $([ "$DRY" = 1 ] && echo dry run || echo full), groups: ${WANT[*]}, deadline ${DEADLINE}s, make -j$JOBS"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv 2>&1 ||
        echo "nvidia-smi: not available"
    nvcc --version 2>&1 | tail -n 1
    # what the build needs (a missing header here explains a failed build at once)
    for h in cblas.h lapacke.h jansson.h nccl.h cublas_v2.h cusolverDn.h microhttpd.h sqlite3.h uv.h curl/curl.h; do
        if echo "#include <$h>" | cc -E -x c -I"${CUDA_HOME:-/usr/local/cuda}/include" - > /dev/null 2>&1; then
            echo "header $h: found"
        else
            echo "header $h: MISSING"
        fi
    done
    "$PY" -c 'import importlib
for m in ("torch", "transformers", "peft"):
    try:
        print(f"python {m}:", importlib.import_module(m).__version__)
    except Exception as e:
        print(f"python {m}: missing ({e})")' 2>&1
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

# use_kit: the programs and libraries tests/gpu/kit.sh made on a machine without a GPU (.gpukit/,
# carried to the device): when its stamp matches this tree, unpack the programs into build/cuda and
# build nothing; put on LD_LIBRARY_PATH only the libraries the loader cannot find here (so python's
# torch keeps its own), looking in the kit, then for the CUDA toolkit's (cuBLAS, cuSOLVER, NCCL) in
# $CUDA_HOME and the CUDA wheels of this python. Prints why it declines; returns 1 then.
GPUKIT=${GPUKIT:-.gpukit}
KIT_LIBS=/tmp/loranull-kit/use
KIT_USED=0
use_kit() {
    [ -f "$GPUKIT/kit.tar.gz" ] || { echo "no $GPUKIT/kit.tar.gz (tests/gpu/kit.sh makes it)"; return 1; }
    local want_stamp have_stamp
    want_stamp=$(cat "$GPUKIT/stamp" 2> /dev/null)
    have_stamp=$(bash tests/gpu/kit_stamp.sh 2> /dev/null)
    if [ -z "$want_stamp" ] || [ "$want_stamp" != "$have_stamp" ]; then
        echo "the kit was built from other sources (stamp ${want_stamp:-none}, this tree $have_stamp)"
        return 1
    fi
    rm -rf /tmp/loranull-kit && mkdir -p /tmp/loranull-kit "$KIT_LIBS" build/cuda/tests build/cuda/bin || return 1
    tar -C /tmp/loranull-kit -xzf "$GPUKIT/kit.tar.gz" || { echo "cannot unpack $GPUKIT/kit.tar.gz"; return 1; }
    cp -p /tmp/loranull-kit/tests/* build/cuda/tests/ && cp -p /tmp/loranull-kit/bin/* build/cuda/bin/ || return 1
    local dirs=("${CUDA_HOME:-/usr/local/cuda}/lib64" "${CUDA_HOME:-/usr/local/cuda}/lib" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib)
    local d
    while read -r d; do dirs+=("$d"); done < <("$PY" -c 'import glob, os, site
for s in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(s, "nvidia", "**", "lib"), recursive=True)):
        print(d)' 2> /dev/null)
    export LD_LIBRARY_PATH="$KIT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local name found missing=""
    for _ in 1 2 3 4 5; do # a library found may need others: again until nothing new resolves
        missing=$(for b in build/cuda/tests/* build/cuda/bin/*; do ldd "$b" 2> /dev/null; done |
            awk '$2 == "=>" && $3 == "not" { print $1 }' | sort -u)
        [ -z "$missing" ] && break
        found=0
        for name in $missing; do
            if [ -e "/tmp/loranull-kit/lib/$name" ]; then
                ln -sf "/tmp/loranull-kit/lib/$name" "$KIT_LIBS/$name" && found=1 && continue
            fi
            for d in "${dirs[@]}"; do
                if [ -e "$d/$name" ]; then ln -sf "$d/$name" "$KIT_LIBS/$name" && found=1 && break; fi
            done
        done
        [ "$found" = 1 ] || break
    done
    echo "kit: stamp $have_stamp; libraries taken from the kit or found elsewhere: $(find "$KIT_LIBS" -mindepth 1 -printf '%f ')"
    [ -z "$missing" ] || echo "kit: still not found (the programs that need them will fail): $missing"
    return 0
}

if want build && [ "${NO_KIT:-0}" != 1 ]; then
    t0=$SECONDS
    if use_kit > "$OUT/kit.log" 2>&1; then # not in a subshell: it exports LD_LIBRARY_PATH
        KIT_USED=1
        record PASS build $((SECONDS - t0)) "from the kit ($GPUKIT), nothing built here: $(grep -c . "$OUT/kit.log") lines in kit.log"
        cat "$OUT/kit.log"
        WANT=("${WANT[@]/build/}")
    else
        why=$(cat "$OUT/kit.log")
        echo "kit not used: $why" | tee "$OUT/kit.log"
    fi
fi

if want build; then
    if ! command -v nvcc > /dev/null; then
        record FAIL build 0 "nvcc not found: no CUDA toolkit on this machine"
        FAILED=1
        exit
    fi
    run_step host build 240 make -j"$JOBS" cuda || { echo "the build failed: nothing else can run"; exit; }
fi

if want tests; then
    run_step gpu test_attention 90 "$BIN/test_attention"
    run_step gpu test_kernels 60 "$BIN/test_kernels"
    run_step gpu test_solver 60 "$BIN/test_solver"
    run_step gpu test_calibrate 45 "$BIN/test_calibrate"
    run_step gpu test_model 90 "$BIN/test_model"
    run_step gpu test_nccl 45 "$BIN/test_nccl"
    run_step gpu test_nccl_procs 45 "$BIN/test_nccl" procs
    run_step gpu test_tp_nccl 45 "$BIN/test_tp_nccl"
    run_step gpu test_memplan_gpu 30 "$BIN/test_memplan_gpu"
    run_step gpu test_hooks 45 "$BIN/test_hooks"
fi

if want gang; then
    # two GPU workers, one GPU each, one 2-rank job over NCCL (skips, saying so, under 2 GPUs)
    run_step gpu gang_gpu 150 "$PY" tests/gpu/gang_gpu.py
fi

if want bench; then
    run_step gpu bench_peak 45 "$BIN/bench_gpu" peak "$OUT/bench_peak.json"
    PEAK=$(sed -n 's/^PEAK_TFLOPS=//p' "$OUT/bench_peak.log" 2> /dev/null | tail -n 1)
    [ -n "$PEAK" ] && export PEAK_TFLOPS=$PEAK
    run_step gpu bench_train 120 "$BIN/bench_gpu" train "$OUT/bench_train.json" "${BENCH_STEPS:-3}"
fi

if want peft; then
    run_step gpu bench_peft 120 "$PY" tests/gpu/bench_peft.py "$OUT/bench_peft.json" "${BENCH_STEPS:-3}"
fi

if want cli; then
    # the CUDA build of the programs needs every library the CPU programs need: a failure here
    # says so and does not stop the rest
    if [ "${KIT_USED:-0}" = 1 ] || run_step host cuda_bin 120 make -j"$JOBS" cuda-bin; then
        run_step gpu cli_train 60 bash tests/gpu/cli_train.sh "$OUT/cli"
    fi
fi

if want calib; then
    # 256 samples need ~1.5 min; with less time left, 64 (the figure is then extrapolated, and says so)
    samples=${BENCH_CALIB_SAMPLES:-256}
    if [ -z "${BENCH_CALIB_SAMPLES:-}" ] && [ $((DEADLINE - (SECONDS - START) - RESERVE)) -lt 150 ]; then samples=64; fi
    run_step gpu bench_calib 150 "$BIN/bench_gpu" calib "$OUT/bench_calib.json" "$samples"
fi

if want init; then
    run_step gpu bench_init 75 "$BIN/bench_gpu" init "$OUT/bench_init.json"
    run_step gpu bench_init_torch 90 "$PY" tests/gpu/bench_init_torch.py "$OUT/bench_init_torch.json"
fi

if want bench-extra; then
    LORANULL_BENCH_RECOMPUTE=1 run_step gpu bench_train_recompute 120 "$BIN/bench_gpu" train \
        "$OUT/bench_train_recompute.json" 2
    LORANULL_BENCH_BF16_WEIGHTS=0 run_step gpu bench_train_fp32w 120 "$BIN/bench_gpu" train \
        "$OUT/bench_train_fp32w.json" 2
    LORANULL_CUDA_ATTN=chunked run_step gpu bench_train_chunked 120 "$BIN/bench_gpu" train \
        "$OUT/bench_train_chunked.json" 2
fi
