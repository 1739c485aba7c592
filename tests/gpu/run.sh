#!/usr/bin/env bash
# tests/gpu/run.sh — build, test and benchmark the CUDA backend on a GPU machine, in one script.
#
#   tests/gpu/run.sh                 every group below, in order
#   tests/gpu/run.sh build tests     only some groups: build | tests | cli | bench | peft | bench-extra
#                                    (bench-extra, not in the default set: recomputation, fp32 weights)
#
# Results go to ${OUT:-tests/gpu/out}: one log per step, bench_*.json, summary.txt (one line
# per step: PASS / FAIL / SKIP / TIMEOUT / NOTRUN with its wall time). Every step runs under
# `timeout` (limits below, overridable as LIMIT_<STEP>=seconds), and the whole script keeps to
# DEADLINE seconds (default 570, under a 600 s device call): a step gets at most the time left,
# and steps that no longer fit are reported NOTRUN. Typically 5-8 minutes on an H200 for the
# default groups (the builds are a good part of it); with less time, run `build tests cli` and
# `bench peft` as two calls (the second reuses the build when the machine is still warm, else
# add `build` to it).
# Needs: the CUDA toolkit (nvcc, cuBLAS, cuSOLVER, NCCL) and what `make` needs for engine+common
# (OpenBLAS, LAPACKE, jansson). Optional: python3 with torch (CUDA), transformers and peft for
# the PEFT comparison (skipped, visibly, when missing). No network.
# Exit status: 0 when nothing FAILed, TIMEd OUT or was NOTRUN (skips allowed), else 1.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-tests/gpu/out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
GROUPS_WANTED=${*:-build tests cli bench peft}
JOBS=$(nproc 2>/dev/null || echo 4)
FAILED=0
DEADLINE=${DEADLINE:-570}
START=$SECONDS

want() { case " $GROUPS_WANTED " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# step NAME LIMIT_SECONDS COMMAND...: runs it with a timeout, logs to $OUT/NAME.log, classifies.
step() {
    local name=$1 limit=$2
    shift 2
    local var="LIMIT_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    limit=${!var:-$limit}
    local left=$((DEADLINE - (SECONDS - START) - 5))
    if [ "$left" -lt 15 ]; then
        printf '%-8s %-14s %4ds  (the %ss deadline leaves no time)\n' NOTRUN "$name" 0 "$DEADLINE" | tee -a "$SUMMARY"
        FAILED=1
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "==> $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$? dt=$((SECONDS - t0)) verdict
    case $rc in
        0) verdict=PASS ;;
        77) verdict=SKIP ;;
        124|137) verdict=TIMEOUT; FAILED=1 ;;
        *) verdict=FAIL; FAILED=1 ;;
    esac
    local why=""
    if [ "$verdict" = SKIP ]; then why=" — $(grep -m1 '^SKIP' "$OUT/$name.log" | cut -c1-160)"; fi
    printf '%-8s %-14s %4ds  rc=%d%s\n' "$verdict" "$name" "$dt" "$rc" "$why" | tee -a "$SUMMARY"
    if [ "$verdict" = FAIL ] || [ "$verdict" = TIMEOUT ]; then
        echo "---- last lines of $OUT/$name.log ----"
        tail -n 25 "$OUT/$name.log"
        echo "----"
    else
        grep -E '^(FAIL|PASS)' "$OUT/$name.log" | head -n 40 || true
    fi
    return $rc
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
    nvcc --version 2>&1 | tail -n 1
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"

if want build; then
    if ! command -v nvcc > /dev/null; then
        echo "SKIP     build          nvcc not found: no CUDA toolkit on this machine" | tee -a "$SUMMARY"
        exit 0
    fi
    step build 240 make -j"$JOBS" cuda || { echo "build failed: nothing else can run"; cat "$SUMMARY"; exit 1; }
fi

BIN=build/cuda/tests
if want tests; then
    step test_kernels 60 "$BIN/test_kernels"
    step test_solver 90 "$BIN/test_solver"
    step test_model 120 "$BIN/test_model"
    step test_nccl 60 "$BIN/test_nccl"
fi

if want cli; then
    # the CUDA build of the programs needs every library the CPU programs need: a failure here
    # says so and does not stop the rest
    if step cuda_bin 150 make -j"$JOBS" cuda-bin; then
        step cli_train 120 bash tests/gpu/cli_train.sh "$OUT/cli"
    fi
fi

if want bench; then
    step bench_peak 60 "$BIN/bench_gpu" peak "$OUT/bench_peak.json"
    PEAK=$(sed -n 's/^PEAK_TFLOPS=//p' "$OUT/bench_peak.log" | tail -n 1)
    [ -n "$PEAK" ] && export PEAK_TFLOPS=$PEAK
    step bench_init 90 "$BIN/bench_gpu" init "$OUT/bench_init.json"
    step bench_train 180 "$BIN/bench_gpu" train "$OUT/bench_train.json" 3
    grep -hE '^(bf16 GEMM|one layer|calibration|LLaMA-3-8B|model FLOPs|memory plan)' \
        "$OUT"/bench_peak.log "$OUT"/bench_init.log "$OUT"/bench_train.log 2> /dev/null | tee "$OUT/bench_summary.txt"
fi

if want bench-extra; then # not in the default set: the same step with recomputation, and fp32 weights
    LORANULL_BENCH_RECOMPUTE=1 step bench_train_recompute 180 "$BIN/bench_gpu" train "$OUT/bench_train_recompute.json" 2
    LORANULL_BENCH_BF16_WEIGHTS=0 step bench_train_fp32w 180 "$BIN/bench_gpu" train "$OUT/bench_train_fp32w.json" 2
    grep -hE '^(LLaMA-3-8B|model FLOPs|step)' "$OUT"/bench_train_recompute.log "$OUT"/bench_train_fp32w.log 2> /dev/null \
        | tee -a "$OUT/bench_summary.txt"
fi

if want peft; then
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    step bench_peft 150 "$PY" tests/gpu/bench_peft.py "$OUT/bench_peft.json"
    grep -h '^transformers' "$OUT/bench_peft.log" 2> /dev/null | tee -a "$OUT/bench_summary.txt"
fi

echo "==== summary ($OUT/summary.txt)"
cat "$SUMMARY"
exit $FAILED
