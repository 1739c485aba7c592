"""LoRA-Null end to end through the `loranull` CLI, against transformers/PEFT (issue 3):

- `loranull covariance` equals the covariances torch computes from the same model's layer inputs;
- `loranull init` for lora_null_v2 equals the paper's torch recipe on those covariances, and for
  pissa / corda equals PEFT's own initialisation of the same checkpoint;
- after 50 training steps with the same rank, lr and data, lora_null_v2's knowledge drift on every
  layer is ≥ 10× smaller than plain lora's; the drift from C equals the drift measured on the
  calibration activations;
- `loranull export` (v1 rank 2r, v2 rank r) loaded with PeftModel.from_pretrained on the ORIGINAL
  base gives our trained model's logits (rel err ≤ 1e-4, fp32), and so does `--merge`.
"""
import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import os
import pathlib

BIN = pathlib.Path(os.environ.get("LORANULL_BIN", pathlib.Path(__file__).resolve().parents[2] / "bin"))

R = 4
MAXLEN = 48
SAMPLES = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
INPUT_OF = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
            "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}


def ln(*args, check=True):
    r = subprocess.run([str(BIN / "loranull"), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"loranull {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}"
    return r


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("loranull_cli")
    cfg = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
    (d / "cfg.json").write_text(json.dumps(cfg))
    ln("model", "new", "--config", d / "cfg.json", "--out", d / "base", "--seed", 3)
    rng = np.random.default_rng(0)
    # Knowledge: 40 short examples; calibration takes SAMPLES windows of MAXLEN tokens of their stream.
    calib = [rng.integers(0, 300, rng.integers(20, MAXLEN)).tolist() for _ in range(40)]
    with open(d / "calib.jsonl", "w") as f:
        for ids in calib:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    # The new task: different data.
    with open(d / "train.jsonl", "w") as f:
        for _ in range(32):
            f.write(json.dumps({"input_ids": rng.integers(0, 300, rng.integers(16, 40)).tolist()}) + "\n")
    (d / "ids.json").write_text(json.dumps([rng.integers(0, 300, 24).tolist() for _ in range(2)]))
    return {"dir": d, "base": d / "base", "calib": calib}


def calib_args(work):
    return ["--calibration", work["dir"] / "calib.jsonl", "--calibration-max-length", MAXLEN,
            "--calibration-samples", SAMPLES, "--calibration-cache", work["dir"] / "cache"]


M64 = (1 << 64) - 1


def calib_windows(examples, samples=SAMPLES, max_length=MAXLEN, seed=0):
    """The calibration samples loranull takes (calibrate.h): the examples joined into one stream,
    `samples` windows of max_length tokens at offsets from splitmix64(seed ^ "calibrat"), drawn by
    rejection — reimplemented here so the references see exactly the same tokens."""
    stream = [t for ex in examples for t in ex]
    if len(stream) <= max_length:
        return [stream]
    state = seed ^ 0x63616C6962726174

    def mix():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(n):
        lim = M64 - M64 % n
        while True:
            x = mix()
            if x < lim:
                return x % n
    return [stream[o:o + max_length] for o in (below(len(stream) - max_length + 1) for _ in range(samples))]


def hf_model(path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def layer_inputs(model, samples):
    """Every target linear layer's input per sample (tokens × d_in, fp64)."""
    got, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            got[name] = []
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: got[name].append(inp[0].detach()[0].double().numpy())))
    with torch.no_grad():
        for ids in samples:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return got


def torch_cov(xs):
    xs = [x / abs(x.max()) for x in xs]
    return sum(x.T @ x for x in xs) / len(xs)


def run_train(work, method, steps=50, extra=()):
    out = work["dir"] / f"run_{method}_{steps}"
    if not (out / "knowledge_drift.json").exists():
        ln("train", "--model", work["base"], "--data", work["dir"] / "train.jsonl", "--out", out, "--method", method,
           "--rank", R, "--lr", "1e-3", "--max-steps", steps, "--batch-size", 4, "--seed", 1, "--eval-every", 25,
           *calib_args(work), *extra)
    return out


# ---------------------------------------------------------------- covariance and init

def test_covariance_cli_equals_torch(work):
    out = work["dir"] / "cov.safetensors"
    r = ln("covariance", "--model", work["base"], "--out", out, *calib_args(work))
    info = json.loads(r.stdout)
    assert info["samples"] == SAMPLES and info["tokens"] == SAMPLES * MAXLEN
    cov = load_file(str(out))
    assert len(cov) == 2 * 4, sorted(cov)  # 4 distinct inputs per layer, not 7
    acts = layer_inputs(hf_model(work["base"]), calib_windows(work["calib"]))
    for l in range(2):
        for t in ("q_proj", "o_proj", "gate_proj", "down_proj"):
            name = f"model.layers.{l}.{MODULES[t]}.{t}"
            assert cov[name].dtype == np.float64
            e = rel(cov[name], torch_cov(acts[name]))
            assert e < 1e-5, f"{name}: rel err {e:.2e}"
    # a second run is a cache hit
    assert json.loads(ln("covariance", "--model", work["base"], "--out", out, *calib_args(work)).stdout)["from_cache"]


def test_init_lora_null_v2_equals_paper_recipe(work):
    out = work["dir"] / "init_v2"
    ln("init", "--model", work["base"], "--method", "lora_null_v2", "--rank", R, "--out", out, *calib_args(work))
    f = load_file(str(out / "init.safetensors"))
    cov = load_file(str(work["dir"] / "cov.safetensors")) if (work["dir"] / "cov.safetensors").exists() else None
    base = hf_model(work["base"])
    acts = layer_inputs(base, calib_windows(work["calib"])) if cov is None else None
    W = {n: m.weight.detach().double().numpy() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for l in range(2):
        for t in TARGETS:
            name = f"model.layers.{l}.{MODULES[t]}.{t}"
            cname = f"model.layers.{l}.{MODULES[INPUT_OF[t]]}.{INPUT_OF[t]}"
            C = cov[cname] if cov is not None else torch_cov(acts[cname])
            A, B = f[name + ".lora_A.weight"], f[name + ".lora_B.weight"]
            assert A.shape == (R, W[name].shape[1]) and B.shape == (W[name].shape[0], R)
            U, S, Vh = torch.linalg.svd(torch.tensor(C))
            Un = U[:, -R:].numpy()
            ref = W[name] @ Un @ Un.T  # the paper: B A = W0 U Uᵀ
            e = rel(B.astype(np.float64) @ A, ref)
            assert e < 1e-5, f"{name}: rel err {e:.2e}"


def _peft_factors(peft_model):
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            key = name.replace("base_model.model.", "", 1)
            s = mod.scaling["default"]
            out[key] = (s * mod.lora_B["default"].weight.detach().double().numpy()
                        @ mod.lora_A["default"].weight.detach().double().numpy(),
                        mod.base_layer.weight.detach().double().numpy())
    return out


@pytest.mark.parametrize("method", ["pissa", "corda"])
def test_init_equals_peft(work, method, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    alpha = 2 * R
    out = tmp_path / method
    ln("init", "--model", work["base"], "--method", method, "--rank", R, "--alpha", alpha, "--out", out,
       *calib_args(work))
    ours = load_file(str(out / "init.safetensors"))
    base = hf_model(work["base"])
    W0 = {n: m.weight.detach().double().numpy() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    if method == "corda":
        cfg = LoraConfig(r=R, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="corda",
                         corda_config=CordaConfig(corda_method="kpm"))

        def run_model():  # the same windows our calibration takes
            for ids in calib_windows(work["calib"]):
                base(torch.tensor([ids]))
        preprocess_corda(base, cfg, run_model=run_model)
    else:
        cfg = LoraConfig(r=R, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="pissa")
    theirs = _peft_factors(get_peft_model(base, cfg))
    assert len(theirs) == 14
    worst = 0.0
    for key, (ba_ref, w_ref) in theirs.items():
        ba = (alpha / R) * ours[key + ".lora_B.weight"].astype(np.float64) @ ours[key + ".lora_A.weight"]
        e = rel(ba, ba_ref)
        worst = max(worst, e)
        # PEFT decomposes in fp32 and a random matrix's singular values sit close together, so its top-r
        # subspace carries ~eps/gap error; ours is fp64. corda also inverts C in fp32.
        assert e < (1e-3 if method == "corda" else 2e-4), f"{method} {key}: B A rel err {e:.2e}"
        # our residual is W0 − BA: compare it with PEFT's residual base weight
        assert rel(W0[key] - ba, w_ref) < 1e-4
    print(f"{method}: worst B A rel err vs PEFT {worst:.2e}")


# ---------------------------------------------------------------- drift after training

def test_drift_v2_ten_times_below_lora(work):
    d_lora = json.loads((run_train(work, "lora") / "knowledge_drift.json").read_text())
    d_v2 = json.loads((run_train(work, "lora_null_v2") / "knowledge_drift.json").read_text())
    assert d_lora["step"] == 50 and d_v2["step"] == 50
    a, b = d_lora["knowledge_drift"], d_v2["knowledge_drift"]
    assert set(a) == set(b) and len(a) == 14
    for k in sorted(a):
        print(f"{k:40s} lora {a[k]:.3e}  lora_null_v2 {b[k]:.3e}  ratio {a[k] / b[k]:.1f}")
        assert a[k] > 0 and b[k] * 10 <= a[k], f"{k}: lora_null_v2 drift {b[k]:.3e} not 10x below lora's {a[k]:.3e}"
    print(f"mean drift: lora {d_lora['knowledge_drift_mean']:.3e}, lora_null_v2 {d_v2['knowledge_drift_mean']:.3e}")
    # the metrics stream carries it every eval interval, and the last row after the final eval
    rows = [json.loads(x) for x in (run_train(work, "lora_null_v2") / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knowledge_drift" in r] == [25, 50]
    assert rows[-1]["knowledge_drift"] == b


@pytest.mark.parametrize("method", ["lora_null_v1", "lora"])
def test_drift_from_cov_equals_activations(work, method):
    run = run_train(work, method)
    exp = work["dir"] / f"exp_drift_{method}"
    ln("export", "--run", run, "--out", exp)
    cfg = json.loads((exp / "adapter_config.json").read_text())
    f = load_file(str(exp / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    ours = json.loads((run / "knowledge_drift.json").read_text())["knowledge_drift"]
    base = hf_model(work["base"])
    acts = layer_inputs(base, calib_windows(work["calib"]))
    W = {n: m.weight.detach().double().numpy() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for key in ours:
        dW = s * f[f"base_model.model.{key}.lora_B.weight"].astype(np.float64) @ f[f"base_model.model.{key}.lora_A.weight"]
        xs = [x / abs(x.max()) for x in acts[key]]
        direct = sum(np.sum((x @ dW.T) ** 2) for x in xs) / sum(np.sum((x @ W[key].T) ** 2) for x in xs)
        assert abs(ours[key] - direct) <= 1e-4 * direct, (key, ours[key], direct)


# ---------------------------------------------------------------- export

def our_logits(work, run):
    out = run / "logits.safetensors"
    ln("forward", "--model", work["base"], "--adapter", run, "--input-ids", work["dir"] / "ids.json", "--out", out)
    return load_file(str(out))["logits"].astype(np.float64)


def hf_logits(model, work):
    ids = torch.tensor(json.loads((work["dir"] / "ids.json").read_text()))
    with torch.no_grad():
        return model(ids).logits.double().numpy()


@pytest.mark.parametrize("method,r_exp,alpha_exp", [("lora_null_v1", 2 * R, 2 * R), ("lora_null_v2", R, R),
                                                    ("pissa", 2 * R, 2 * R), ("lora", R, 2 * R)])
def test_export_peft_and_merge_equal_our_model(work, method, r_exp, alpha_exp):
    from peft import PeftModel
    run = run_train(work, method, steps=10)
    ours = our_logits(work, run)
    exp, merged = work["dir"] / f"exp_{method}", work["dir"] / f"merged_{method}"
    ln("export", "--run", run, "--out", exp)
    ln("export", "--run", run, "--out", merged, "--merge")
    cfg = json.loads((exp / "adapter_config.json").read_text())
    assert cfg["r"] == r_exp and cfg["lora_alpha"] == alpha_exp and cfg["peft_type"] == "LORA"
    f = load_file(str(exp / "adapter_model.safetensors"))
    assert f["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (r_exp, 64)
    assert f["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, r_exp)
    peft_model = PeftModel.from_pretrained(hf_model(work["base"]), str(exp)).eval()
    theirs = hf_logits(peft_model, work)
    base = hf_logits(hf_model(work["base"]), work)
    e_peft, e_merge = rel(theirs, ours), rel(hf_logits(hf_model(merged), work), ours)
    moved = rel(ours, base)
    print(f"{method}: PEFT on original base vs ours rel err {e_peft:.2e}, merged {e_merge:.2e} "
          f"(training moved the logits by {moved:.2e})")
    assert moved > 1e-3  # the adapter did change the model, so the comparison means something
    assert e_peft <= 1e-4 and e_merge <= 1e-4


def test_export_errors_are_clear(work, tmp_path):
    r = ln("export", "--run", tmp_path, "--out", tmp_path / "x", check=False)
    assert r.returncode != 0 and "neither adapter.safetensors nor a full model" in r.stderr
    r = ln("init", "--model", work["base"], "--method", "lora_null_v2", "--rank", R, "--out", tmp_path / "y",
           check=False)
    assert r.returncode != 0 and "needs --calibration FILE" in r.stderr
    r = ln("init", "--model", work["base"], "--method", "nullspace", "--rank", R, "--out", tmp_path / "y", check=False)
    assert r.returncode != 0 and "unknown method 'nullspace'" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": "x"}\n')
    r = ln("covariance", "--model", work["base"], "--calibration", bad, "--out", tmp_path / "c.safetensors",
           "--no-calibration-cache", check=False)
    assert r.returncode != 0 and "line 2" in r.stderr


def test_init_same_bits_fresh_or_cached(work, tmp_path):
    """A fresh calibration (forward passes ran first) and a cache hit give bit-identical factors."""
    cache = tmp_path / "cache"
    args = ["init", "--model", work["base"], "--method", "lora_null_v1", "--rank", R, "--calibration",
            work["dir"] / "calib.jsonl", "--calibration-max-length", MAXLEN, "--calibration-cache", cache]
    a = json.loads(ln(*args, "--out", tmp_path / "a").stdout)
    b = json.loads(ln(*args, "--out", tmp_path / "b").stdout)
    assert not a["from_cache"] and b["from_cache"]
    assert (tmp_path / "a" / "init.safetensors").read_bytes() == (tmp_path / "b" / "init.safetensors").read_bytes()


def test_resume_with_calibration_is_bit_identical(work, tmp_path):
    common = ["--model", work["base"], "--data", work["dir"] / "train.jsonl", "--method", "lora_null_v1", "--rank", R,
              "--lr", "1e-3", "--max-steps", 12, "--batch-size", 4, "--seed", 1, *calib_args(work)]
    ln("train", *common, "--out", tmp_path / "once")
    ln("train", *common, "--out", tmp_path / "twice", "--save-every", 6, "--stop-at-step", 6)
    ln("train", *common, "--out", tmp_path / "twice", "--save-every", 6, "--resume",
       tmp_path / "twice" / "checkpoints" / "step-000006")
    assert (tmp_path / "once" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "twice" / "adapter.safetensors").read_bytes()
    d1 = json.loads((tmp_path / "once" / "knowledge_drift.json").read_text())
    d2 = json.loads((tmp_path / "twice" / "knowledge_drift.json").read_text())
    assert d1 == d2 and d1["step"] == 12


def test_merge_keeps_the_base_dtype(work, tmp_path):
    """A bf16 base merges into a bf16 checkpoint whose logits match our trained model's to bf16 rounding."""
    ln("model", "new", "--config", work["dir"] / "cfg.json", "--out", tmp_path / "base16", "--seed", 3,
       "--dtype", "bf16")
    run = tmp_path / "run"
    ln("train", "--model", tmp_path / "base16", "--data", work["dir"] / "train.jsonl", "--out", run, "--method",
       "lora_null_v2", "--rank", R, "--lr", "1e-2", "--max-steps", 5, "--batch-size", 4, *calib_args(work))
    ln("export", "--run", run, "--out", tmp_path / "merged", "--merge")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    out = run / "logits.safetensors"
    ln("forward", "--model", tmp_path / "base16", "--adapter", run, "--input-ids", work["dir"] / "ids.json", "--out", out)
    ours = load_file(str(out))["logits"].astype(np.float64)
    merged = hf_logits(hf_model(tmp_path / "merged"), work)
    base = hf_logits(hf_model(tmp_path / "base16"), work)
    e, moved = rel(merged, ours), rel(base, ours)
    print(f"bf16 merge vs ours {e:.2e} (training moved logits by {moved:.2e})")
    assert e < 2e-2 and e < moved


def test_cache_key_is_the_model_content(work, tmp_path):
    """The same weights saved as two shards hit the cache of the single-file copy; other weights miss."""
    from safetensors.numpy import save_file
    import shutil
    whole = load_file(str(work["base"] / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(work["base"] / "config.json", sharded / "config.json")
    names = sorted(whole)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ns in halves.items():
        save_file({n: whole[n] for n in ns}, str(sharded / f))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}}))
    cache = tmp_path / "cache"
    args = ["--calibration", work["dir"] / "calib.jsonl", "--calibration-max-length", MAXLEN, "--calibration-cache",
            cache]
    first = json.loads(ln("covariance", "--model", work["base"], "--out", tmp_path / "a.safetensors", *args).stdout)
    second = json.loads(ln("covariance", "--model", sharded, "--out", tmp_path / "b.safetensors", *args).stdout)
    assert not first["from_cache"] and second["from_cache"]
    whole["model.layers.0.mlp.up_proj.weight"] = whole["model.layers.0.mlp.up_proj.weight"] * 1.001
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(work["base"] / "config.json", other / "config.json")
    save_file(whole, str(other / "model.safetensors"))
    third = json.loads(ln("covariance", "--model", other, "--out", tmp_path / "c.safetensors", *args).stdout)
    assert not third["from_cache"]
