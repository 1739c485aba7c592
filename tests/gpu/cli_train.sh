#!/usr/bin/env bash
# tests/gpu/cli_train.sh DIR — `loranull train` end to end on the GPU (the CUDA build of the CLI,
# build/cuda/bin/loranull) against the same command on the CPU: a random tiny LLaMA, 16
# pre-tokenized examples, LoRA-Null-v2 calibrated on the same file, 8 steps. The two runs'
# per-step losses must agree within 2e-2 relative (the GPU runs bf16 tensor-core GEMMs), the GPU
# run's calibration must have summed on the device (sums=cuda in its log), its frozen weights must
# have been multiplied from bf16 copies (the engine's "bf16 weights: 15 frozen" log line, for the
# calibration and for training), and both must have written the adapter; and a model far too big
# for the GPU is refused at once by the
# memory plan, naming needed vs free. Head dim 64: the GPU run (bf16 math) takes the fused flash
# attention kernels. Exit 77 (skip) when no GPU is usable.
set -u
DIR=${1:-tests/gpu/out/cli}
BIN=$(pwd)/build/cuda/bin/loranull
rm -rf "$DIR" && mkdir -p "$DIR" && cd "$DIR" || exit 1
[ -x "$BIN" ] || { echo "FAIL $BIN is not built (make cuda-bin)"; exit 1; }
cat > cfg.json <<'CFG'
{"vocab_size":300,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":1,
 "num_key_value_heads":1,"head_dim":64,"max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,
 "tie_word_embeddings":false}
CFG
"$BIN" model new --config cfg.json --out tiny --seed 3 --no-tokenizer || exit 1
for i in $(seq 1 16); do
    printf '{"input_ids":['
    for t in $(seq 1 40); do printf '%d' $(( (i * 31 + t * 7 + i * t) % 300 )); [ "$t" -lt 40 ] && printf ','; done
    printf ']}\n'
done > data.jsonl
run() { # device out
    "$BIN" train --device "$1" --model tiny --data data.jsonl --out "$2" --max-steps 8 --batch-size 4 \
        --method lora_null_v2 --rank 4 --lr 2e-3 --calibration data.jsonl --calibration-samples 16 \
        --no-calibration-cache 2>&1
}
run cpu run_cpu > cpu.log || { cat cpu.log; echo "FAIL the CPU run"; exit 1; }
run cuda run_gpu > gpu.log
rc=$?
if [ $rc -ne 0 ] && grep -q "no usable GPU" gpu.log; then echo "SKIP: cli_train: $(tail -n 1 gpu.log)"; exit 77; fi
[ $rc -eq 0 ] || { cat gpu.log; echo "FAIL the GPU run"; exit 1; }
losses() { sed -n 's/.*"loss":\([-0-9.e+]*\).*/\1/p' "$1/metrics.jsonl"; }
paste <(losses run_cpu) <(losses run_gpu) > losses.tsv
cat losses.tsv
awk 'BEGIN { w = 0; n = 0 }
     { n++; d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > w) w = d }
     END { printf "%s cli_train: %d steps, worst relative loss difference GPU vs CPU %.3g (tol 2e-2)\n",
                  (n == 8 && w <= 2e-2) ? "PASS" : "FAIL", n, w; exit !(n == 8 && w <= 2e-2) }' losses.tsv || exit 1
# --device cuda routes calibration to the device accumulator (DSYRK on the GPU), --device cpu does not
grep -q '"calibration".*sums=cuda' gpu.log || { grep calibration gpu.log; echo "FAIL cli_train: the GPU run's calibration did not sum its covariances on the device (no sums=cuda logged)"; exit 1; }
grep -q '"calibration".*sums=host' cpu.log || { grep calibration cpu.log; echo "FAIL cli_train: the CPU run's calibration log has no sums=host"; exit 1; }
# the engine froze the 14 linears and lm_head into bf16 copies through the CUDA table's freeze hook:
# once for the calibration's forwards, once (after the init rewrote W0) for training; the CPU none
frozen=$(grep -c '"engine".*bf16 weights: 15 frozen' gpu.log)
[ "$frozen" -ge 2 ] || { grep '"engine"' gpu.log; echo "FAIL cli_train: the GPU run logged 'bf16 weights: 15 frozen' $frozen times (expected for calibration and training)"; exit 1; }
! grep -q 'weights: [0-9]* frozen' cpu.log || { echo "FAIL cli_train: the CPU run froze weights"; exit 1; }
for f in run_cpu/adapter.safetensors run_gpu/adapter.safetensors; do
    [ -s "$f" ] || { echo "FAIL $f missing"; exit 1; }
done
# a model that cannot fit fails before anything is loaded, with needed vs free (only config.json
# exists: the plan comes first)
mkdir -p huge
cat > huge/config.json <<'CFG'
{"vocab_size":128256,"hidden_size":8192,"intermediate_size":28672,"num_hidden_layers":400,"num_attention_heads":64,
 "num_key_value_heads":8,"head_dim":128,"max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":500000.0,
 "tie_word_embeddings":false}
CFG
"$BIN" train --device cuda --model huge --data data.jsonl --out run_huge --max-steps 1 > huge.log 2>&1
rc=$?
cat huge.log
if [ $rc -eq 0 ] || ! grep -q "GPU memory plan: the job needs" huge.log; then
    echo "FAIL cli_train: a model that cannot fit was not refused by the memory plan"; exit 1
fi
echo "PASS cli_train"
