#!/usr/bin/env bash
# Runs every benchmark in tests/bench (bench_*.sh with bash, bench_*.py with the venv's python), in turn.
# Benchmarks print what they measured; they are not tests and do not fail the build on slow numbers.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
status=0
for b in tests/bench/bench_*; do
  case "$b" in
    *.sh) echo "== $b"; bash "$b" || status=1 ;;
    *.py) echo "== $b"; "$PY" "$b" || status=1 ;;
    *) continue ;;
  esac
done
exit $status
