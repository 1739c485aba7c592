#!/usr/bin/env bash
# loranull-server on loopback, measured with wrk (Debian): GET job and list jobs (req/s and p99 at
# 64 connections), job creation/s (each is an fsynced SQLite commit), and 1,000 concurrent SSE
# streams with the delay from an event posted to its arrival on every stream.
# Prints what it measured; appends nothing by itself (copy the summary into RESULTS.md).
#   DURATION=10 THREADS=4 bash tests/bench/bench_server.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin/loranull-server}
PY=${PY:-.venv/bin/python}
DURATION=${DURATION:-10}
THREADS=${THREADS:-4}
STREAMS=${STREAMS:-1000}
[ -x "$BIN" ] || { echo "bench_server: $BIN not built (make)"; exit 1; }
command -v wrk >/dev/null || { echo "bench_server: wrk not installed (make deps)"; exit 1; }
DIR=$(mktemp -d)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
KEY=$("$BIN" keys create --project bench --data-dir "$DIR" 2>/dev/null)
TOK=$("$BIN" tokens create --name bench --data-dir "$DIR" 2>/dev/null)
"$BIN" --listen 127.0.0.1:$PORT --data-dir "$DIR" --threads "$THREADS" --no-access-log 2>"$DIR/server.log" &
SRV=$!
cleanup() { kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
for _ in $(seq 100); do curl -sf "$URL/healthz" >/dev/null && break; sleep 0.05; done

printf '{"text":"bench"}\n' > "$DIR/t.jsonl"
FILE=$(curl -sf -H "Authorization: Bearer $KEY" -F purpose=fine-tune -F file=@"$DIR/t.jsonl" "$URL/v1/files" |
       "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for i in $(seq 50); do
  curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
       -d "{\"model\":\"m\",\"training_file\":\"$FILE\",\"metadata\":{\"i\":\"$i\"}}" "$URL/v1/fine_tuning/jobs" >"$DIR/job.json"
done
JOB=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$DIR/job.json")

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); server threads: $THREADS; wrk -t2 -c64 -d${DURATION}s"
summary() { # label, wrk output
  local rps p99 p50
  rps=$(grep 'Requests/sec' <<<"$2" | awk '{print $2}')
  p50=$(grep -E '^ +50%' <<<"$2" | awk '{print $2}')
  p99=$(grep -E '^ +99%' <<<"$2" | awk '{print $2}')
  local errs; errs=$(grep -E 'Non-2xx|Socket errors' <<<"$2" | xargs || true)
  printf '%-28s %10s req/s   p50 %8s   p99 %8s   %s\n' "$1" "$rps" "$p50" "$p99" "$errs"
}
OUT=$(wrk -t2 -c64 -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" "$URL/v1/fine_tuning/jobs/$JOB")
summary "GET job" "$OUT"
OUT=$(wrk -t2 -c64 -d"${DURATION}s" --latency -H "Authorization: Bearer $KEY" "$URL/v1/fine_tuning/jobs?limit=20")
summary "GET jobs?limit=20" "$OUT"
OUT=$(wrk -t2 -c64 -d"${DURATION}s" --latency "$URL/healthz")
summary "GET /healthz (no auth, no DB)" "$OUT"
cat > "$DIR/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
wrk.body = '{"model":"m","training_file":"$FILE","adapter":{"type":"lora_null_v2","rank":8}}'
LUA
OUT=$(wrk -t2 -c16 -d"${DURATION}s" --latency -s "$DIR/post.lua" "$URL/v1/fine_tuning/jobs")
summary "POST job (16 conns, fsync)" "$OUT"
echo "SSE ($STREAMS streams of one running job, 20 events 250 ms apart):"
ulimit -n 20000 2>/dev/null || true
"$PY" tests/bench/sse_bench.py "$URL" "$KEY" "$TOK" --streams "$STREAMS" --events 20
