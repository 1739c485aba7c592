#!/usr/bin/env bash
# demo.sh — `make demo`: the whole of loranull on this machine in a minute or two.
#
#  1. starts loranull-server (SQLite under var/demo/server) and one CPU loranull-worker;
#  2. makes a small LLaMA (`loranull model new`) and teaches it some "facts" by full fine-tuning,
#     so that it has knowledge to lose;
#  3. uploads a new task (adding numbers) and the facts with curl, and submits two jobs through the
#     public API: lora_null_v2 (calibrated on the facts) and, for comparison, plain lora;
#  4. shows the jobs' events live (SSE), then a summary: task loss before/after, what happened to
#     the facts (loss and knowledge drift), where the adapters are, and the dashboard's URL.
# Everything it starts is stopped on exit. Environment: LORANULL_DEMO_DIR (default var/demo),
# LORANULL_DEMO_PORT (default: a free port), LORANULL_DEMO_KEEP=1 (leave server and worker running),
# LORANULL_BIN (default bin/).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BIN=${LORANULL_BIN:-$ROOT/bin}
DEMO=${LORANULL_DEMO_DIR:-$ROOT/var/demo}
PY=python3
# A model this small gains nothing from threads, and spinning OpenMP threads on a busy machine
# cost more than they give: one thread per process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}

if [ -t 1 ]; then B=$'\033[1m'; N=$'\033[0m'; else B=""; N=""; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

for b in loranull loranull-server loranull-worker; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing: run make first (make demo builds it)"
done
command -v curl >/dev/null || die "curl is needed (make deps installs it)"
command -v $PY >/dev/null || die "python3 is needed to read JSON"

SERVER_PID="" WORKER_PID=""
cleanup() {
  local rc=$?
  if [ "${LORANULL_DEMO_KEEP:-0}" = 1 ] && [ $rc -eq 0 ]; then
    echo "demo: leaving the server (pid $SERVER_PID) and worker (pid $WORKER_PID) running (LORANULL_DEMO_KEEP=1)"
    return
  fi
  for p in $WORKER_PID $SERVER_PID; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $WORKER_PID $SERVER_PID; do wait "$p" 2>/dev/null || true; done
  [ $rc -eq 0 ] || echo "demo: failed; logs are in $DEMO/server.log and $DEMO/worker.log" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T0=$(date +%s)
rm -rf "$DEMO"
mkdir -p "$DEMO/data" "$DEMO/models"
PORT=${LORANULL_DEMO_PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
SRV_ARGS=(--data-dir "$DEMO/server" --migrations-dir "$ROOT/migrations")

# ---------------------------------------------------------------- server, keys, worker token
step "Starting loranull-server on $URL (SQLite in $DEMO/server)"
KEY=$("$BIN/loranull-server" keys create --project demo "${SRV_ARGS[@]}" 2>/dev/null)
"$BIN/loranull-server" tokens create --name demo-worker "${SRV_ARGS[@]}" 2>/dev/null >"$DEMO/worker.token"
"$BIN/loranull-server" --listen "127.0.0.1:$PORT" "${SRV_ARGS[@]}" --static-dir "$ROOT/server/static" \
  >"$DEMO/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do curl -fs "$URL/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$URL/healthz" >/dev/null || die "the server did not start; see $DEMO/server.log"
echo "API key for project 'demo': $KEY"

# ---------------------------------------------------------------- data
step "Generating data: 40 facts (knowledge), a new task (adding numbers)"
$PY - "$DEMO/data" <<'EOF'
import json, random, sys
out = sys.argv[1]
rng = random.Random(7)
syl = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "ze", "pa", "do", "ri", "ma", "ke", "lu", "fo"]
word = lambda n: "".join(rng.choice(syl) for _ in range(n)).capitalize()
countries = []
while len(countries) < 40:
    w = word(3)
    if w not in countries:
        countries.append(w)
facts = [{"text": f"The capital of {c} is {word(2)}."} for c in countries]
task = []
for _ in range(96):
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    task.append({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."})
def write(name, rows):
    with open(f"{out}/{name}", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
write("facts.jsonl", facts)
write("task_train.jsonl", task[:80])
write("task_valid.jsonl", task[80:])
EOF
head -n 2 "$DEMO/data/facts.jsonl" "$DEMO/data/task_train.jsonl"

# ---------------------------------------------------------------- the base model
step "Creating a small LLaMA (2 layers, hidden 96) and teaching it the facts (full fine-tuning)"
cat >"$DEMO/data/config.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 96,
 "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "max_position_embeddings": 128, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false}
EOF
"$BIN/loranull" model new --config "$DEMO/data/config.json" --out "$DEMO/random-llama" --seed 1
"$BIN/loranull" train --model "$DEMO/random-llama" --data "$DEMO/data/facts.jsonl" --method full \
  --epochs 60 --batch-size 8 --lr 3e-3 --warmup-ratio 0.05 --out "$DEMO/pretrain" 2>&1 | tail -n 1
MODEL=demo-llama
mkdir -p "$DEMO/models/$MODEL"
cp "$DEMO/pretrain/config.json" "$DEMO/pretrain/model.safetensors" "$DEMO/random-llama/tokenizer.json" "$DEMO/models/$MODEL/"

step "Starting loranull-worker (CPU) with the models in $DEMO/models"
"$BIN/loranull-worker" --server "$URL" --token-file "$DEMO/worker.token" --models "$DEMO/models" --device cpu \
  --work-dir "$DEMO/worker" --name demo-worker >"$DEMO/worker.log" 2>&1 &
WORKER_PID=$!

# ---------------------------------------------------------------- the public API, with curl
json() { $PY -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
upload() {
  curl -fsS -H "Authorization: Bearer $KEY" -F purpose=fine-tune -F "file=@$1" "$URL/v1/files" | json id
}
step "Uploading the files (POST /v1/files)"
TRAIN=$(upload "$DEMO/data/task_train.jsonl")
VALID=$(upload "$DEMO/data/task_valid.jsonl")
FACTS=$(upload "$DEMO/data/facts.jsonl")
echo "task_train.jsonl → $TRAIN   task_valid.jsonl → $VALID   facts.jsonl → $FACTS"

submit() { # method
  curl -fsS -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' "$URL/v1/fine_tuning/jobs" -d @- <<EOF | json id
{"model": "$MODEL", "training_file": "$TRAIN", "validation_file": "$VALID", "seed": 1, "suffix": "$1",
 "hyperparameters": {"n_epochs": 20, "batch_size": 8, "learning_rate": 0.005, "eval_interval": 20},
 "adapter": {"type": "$1", "rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "calibration": {"file": "$FACTS", "samples": 40, "max_length": 64}}}
EOF
}
step "Submitting two jobs (POST /v1/fine_tuning/jobs): lora_null_v2, and plain lora to compare"
JOB_NULL=$(submit lora_null_v2)
JOB_LORA=$(submit lora)
echo "lora_null_v2 → $JOB_NULL   lora → $JOB_LORA"

# Live progress: the job's event stream (SSE), printed as it comes, until the job ends.
watch_job() { # job label
  curl -fsSN --max-time 600 -H "Authorization: Bearer $KEY" "$URL/v1/fine_tuning/jobs/$1/events?stream=true" |
    $PY -u -c '
import json, sys, time
label = sys.argv[1]
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.startswith("data: "):
        continue
    data = line[6:]
    if data == "[DONE]":
        break
    ev = json.loads(data)
    t = time.strftime("%H:%M:%S", time.localtime(ev.get("created_at", time.time())))
    level, msg = ev.get("level", "info"), ev["message"]
    print(f"  {t} [{label}] {level:5} {msg}")
' "$2"
}
step "Training (events streamed from GET /v1/fine_tuning/jobs/{id}/events?stream=true)"
watch_job "$JOB_NULL" lora_null_v2
watch_job "$JOB_LORA" lora

# ---------------------------------------------------------------- results
step "Downloading the adapters (GET /v1/files/{id}/content)"
for pair in "lora_null_v2:$JOB_NULL" "lora:$JOB_LORA"; do
  method=${pair%%:*} job=${pair#*:}
  mkdir -p "$DEMO/adapters/$method"
  curl -fsS -H "Authorization: Bearer $KEY" "$URL/v1/fine_tuning/jobs/$job" >"$DEMO/adapters/$method/job.json"
  curl -fsS -H "Authorization: Bearer $KEY" "$URL/v1/fine_tuning/jobs/$job/metrics" >"$DEMO/adapters/$method/metrics.json"
  for fid in $($PY -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["result_files"]))' "$DEMO/adapters/$method/job.json"); do
    name=$(curl -fsS -H "Authorization: Bearer $KEY" "$URL/v1/files/$fid" | json filename)
    curl -fsS -H "Authorization: Bearer $KEY" "$URL/v1/files/$fid/content" -o "$DEMO/adapters/$method/$name"
  done
done

step "Summary"
$PY - "$DEMO" "$URL" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, os, sys
demo, url, took = sys.argv[1], sys.argv[2], sys.argv[3]
rows, ok = {}, True
for m in ("lora_null_v2", "lora"):
    d = os.path.join(demo, "adapters", m)
    job = json.load(open(os.path.join(d, "job.json")))
    if job["status"] != "succeeded":
        print(f"{m}: the job {job['id']} is {job['status']}: {job.get('error')}")
        ok = False
        continue
    s = json.load(open(os.path.join(d, "eval_summary.json")))
    rows[m] = (job, s, d)
if not ok:
    sys.exit(1)
print(f"{'':24}{'lora_null_v2':>16}{'lora':>16}")
def line(label, f, fmt):
    print(f"{label:24}" + "".join(f"{fmt(f(rows[m][1])):>16}" for m in ("lora_null_v2", "lora")))
line("task loss before", lambda s: s["before"]["task_loss"], lambda v: f"{v:.3f}")
line("task loss after", lambda s: s["after"]["task_loss"], lambda v: f"{v:.3f}")
line("facts loss before", lambda s: s["before"]["knowledge_loss"], lambda v: f"{v:.3f}")
line("facts loss after", lambda s: s["after"]["knowledge_loss"], lambda v: f"{v:.3f}")
line("knowledge drift (mean)", lambda s: s["knowledge_drift"]["mean"], lambda v: f"{v:.2e}")
line("knowledge drift (max)", lambda s: s["knowledge_drift"]["max"], lambda v: f"{v:.2e}")
n = rows["lora_null_v2"][1]
print()
print(f"task learnt:     loss {n['before']['task_loss']:.3f} -> {n['after']['task_loss']:.3f} on the held-out task examples (lora_null_v2)")
print(f"knowledge kept:  loss on the facts {n['before']['knowledge_loss']:.3f} -> {n['after']['knowledge_loss']:.3f}, "
      f"drift {n['knowledge_drift']['mean']:.2e} (lora: {rows['lora'][1]['after']['knowledge_loss']:.3f}, "
      f"drift {rows['lora'][1]['knowledge_drift']['mean']:.2e})")
print(f"adapter:         {rows['lora_null_v2'][2]}/adapter_model.safetensors (+ adapter_config.json: PEFT, for the original base)")
print(f"fine-tuned:      {rows['lora_null_v2'][0]['fine_tuned_model']}")
keep = os.environ.get("LORANULL_DEMO_KEEP") == "1"
print(f"dashboard:       {url}/" + ("" if keep else "   (stopped with the demo: LORANULL_DEMO_KEEP=1 make demo keeps it up)"))
print(f"demo finished in {took} s")
EOF
