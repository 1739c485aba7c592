#!/usr/bin/env bash
# Runs every benchmark in tests/bench (bench_*.sh with bash, bench_*.py with the venv's python), in turn.
# Benchmarks print what they measured; they are not tests and do not fail the build on slow numbers.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
status=0
# C benchmark programs (tests/bench/bench_*.c) -> build/release/bench/, with the Makefile's own
# flags and libraries (printed by make from an extra rule given on stdin; the Makefile is not edited).
build_bench_progs() {
  local flags
  flags=$(printf 'print-bench-flags:\n\t@echo $(CC) $(CFLAGS) $(LDFLAGS) @@ $(LIBS) $(LDLIBS)\n' |
          make -s --no-print-directory -f Makefile -f - print-bench-flags V=release) || return 1
  mkdir -p build/release/bench
  for c in tests/bench/bench_*.c; do
    [ -e "$c" ] || continue
    local out="build/release/bench/$(basename "$c" .c)"
    echo "== build $c -> $out"
    ${flags/@@/-o $out $c} || return 1
  done
}
build_bench_progs || { echo "run.sh: building the C benchmark programs failed" >&2; exit 1; }
[ "${1:-}" = "--build-only" ] && exit 0
for b in tests/bench/bench_*; do
  case "$b" in
    *.sh) echo "== $b"; bash "$b" || status=1 ;;
    *.py) echo "== $b"; "$PY" "$b" || status=1 ;;
    *) continue ;;
  esac
done
exit $status
