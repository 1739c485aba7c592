"""`loranull train | init | covariance --ranks N`: the command as N tensor-parallel ranks on N threads
(worker/cli/ranks.h) gives the 1-rank results.

- train: every method the CLI trains, 2 and 4 ranks against 1 — adapter (or model) and every
  metrics row within 1e-5 relative; with validation, packing, checkpoints and resume across rank counts;
- covariance: calibration on shards equals the 1-rank covariances;
- init: lora_null_v1/v2 initialised on shards (eigensolves spread: 8 per model, 8/N per rank) equals
  the 1-rank init on the same covariances;
- errors: N < 1, N too large, N not dividing the heads / kv heads / intermediate size (named),
  and a CUDA device with N > 1.
"""
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine_ref import rel_err, run
from test_engine_cli import one_line_error

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin"))
CUDA_BIN = BIN.parent / "build" / "cuda" / "bin" / "loranull"

R = 4            # adapter rank
STEPS = 8
CFG = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
CALIB = ["--calibration-max-length", 48, "--calibration-samples", 32, "--no-calibration-cache"]
METHODS = ["lora", "lora_fa", "pissa", "milora", "corda", "lora_null_v1", "lora_null_v2", "full"]
NEEDS_COV = {"corda", "lora_null_v1", "lora_null_v2"}
# AdamW's first step is lr·g/(|g| + 1e-8): a gradient element near 1e-8 moves its weight by a
# fraction of lr that depends on its exact value. o_proj's B has such elements wherever A (corda's,
# the LoRA-Null bases) reads input directions with almost no energy (this model's attention outputs
# have eigenvalues ~1e-4): B's gradient there is ~4e-9, a cancellation whose value moves by several
# % with any rounding — perturbing every base weight by ±1 ulp on one rank moves one such step from
# 0.286·lr to 0.269·lr; 2 ranks' rank-order sums give 0.321·lr. So o_proj's B has its own, looser
# bound, and for corda (whose o_proj B has the largest such elements) so do the factors that the
# changed B feeds in the next steps.
NOISY = "o_proj.lora_B"


def worst(a_path, b_path, skip=()):
    """The largest relative difference over the tensors of two safetensors files (same names)."""
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert sorted(a) == sorted(b)
    return max(rel_err(a[k], b[k]) for k in a if not any(s in k for s in skip))


def new_model(d, name, **over):
    cfg = dict(CFG, **over)
    (d / f"{name}.json").write_text(json.dumps(cfg))
    run("model", "new", "--config", d / f"{name}.json", "--out", d / name, "--seed", 3)
    return d / name


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_ranks")
    new_model(d, "base")
    rng = np.random.default_rng(0)

    def jsonl(name, n, lo, hi):
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input_ids": rng.integers(0, 300, rng.integers(lo, hi)).tolist()}) + "\n")
        return d / name
    w = {"dir": d, "base": d / "base", "train": jsonl("train.jsonl", 32, 12, 40), "val": jsonl("val.jsonl", 8, 12, 30),
         "calib": jsonl("calib.jsonl", 40, 20, 48)}
    w["cov"] = d / "cov_1.safetensors"
    run("covariance", "--model", w["base"], "--calibration", w["calib"], *CALIB, "--out", w["cov"])
    return w


def train(work, out, ranks, method="lora", *extra):
    cov = ["--covariance", work["cov"]] if method in NEEDS_COV else []
    r = run("train", "--model", work["base"], "--data", work["train"], "--out", out, "--method", method,
            "--rank", R, "--lr", "1e-3", "--max-steps", STEPS, "--batch-size", 4, "--seed", 1,
            "--ranks", ranks, *cov, *extra, check=False)
    assert r.returncode == 0, f"train --ranks {ranks} {method} {extra} failed:\n{r.stderr[-3000:]}"
    return r


def assert_same_training(out, ref, method="lora", what=""):
    """out's trained adapter (or model) and metrics rows equal ref's within 1e-5 relative, but for
    o_proj's B: see NOISY."""
    a, b = result_file(out, method), result_file(ref, method)
    w, noisy = worst(a, b, skip=(NOISY,)), worst(a, b)
    print(f"{what or method}: {w:.2e} ({noisy:.2e} with o_proj's B)")
    assert w <= (3e-5 if method == "corda" else 1e-5), f"{what or method}: trained tensors differ by {w:.3g}"
    assert noisy <= 3e-3, f"{what or method}: o_proj's B differs by {noisy:.3g} relative"
    assert_rows_close(metrics(out), metrics(ref))


def result_file(out, method):
    return out / ("model.safetensors" if method == "full" else "adapter.safetensors")


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_rows_close(rows, ref, tol=1e-5):
    """Every row of rows against ref's row of the same step (a resumed run has the later ones)."""
    by_step = {r["step"]: r for r in ref}
    assert rows and all(r["step"] in by_step for r in rows), ([r["step"] for r in rows], list(by_step))
    for a in rows:
        b = by_step[a["step"]]
        for k in ("loss", "val_loss", "grad_norm"):
            if k in b:
                assert abs(a[k] - b[k]) <= tol * abs(b[k]), (a["step"], k, a[k], b[k])


# ---------------------------------------------------------------- train


@pytest.mark.parametrize("method", METHODS)
def test_train_ranks_equal_one_rank(work, method):
    d = work["dir"] / f"train_{method}"
    train(work, d / "r1", 1, method)
    for ranks in (2, 4):
        train(work, d / f"r{ranks}", ranks, method)
        assert_same_training(d / f"r{ranks}", d / "r1", method, f"{method}, {ranks} ranks vs 1")
        if method in NEEDS_COV:  # the knowledge drift at the end, from the same covariances
            a = json.loads((d / f"r{ranks}" / "knowledge_drift.json").read_text())
            b = json.loads((d / "r1" / "knowledge_drift.json").read_text())
            assert a["step"] == b["step"] == STEPS
            assert abs(a["knowledge_drift_max"] - b["knowledge_drift_max"]) <= 1e-3 * b["knowledge_drift_max"]


def test_train_ranks_with_validation_and_packing(work):
    d = work["dir"] / "train_val_pack"
    extra = ["--val-data", work["val"], "--eval-every", 4, "--pack", 64]
    train(work, d / "r1", 1, "lora", *extra)
    train(work, d / "r2", 2, "lora", *extra)
    assert sum("val_loss" in r for r in metrics(d / "r2")) >= 2
    assert_same_training(d / "r2", d / "r1", what="validation + packing, 2 ranks vs 1")


def test_train_ranks_resume_across_rank_counts(work):
    """A 2-rank run stopped at step 4 resumes on 2, 4 and 1 ranks to the uninterrupted 1-rank adapter."""
    d = work["dir"] / "train_resume"
    train(work, d / "whole", 1, "lora_null_v2", "--save-every", 4)
    train(work, d / "cut", 2, "lora_null_v2", "--save-every", 4, "--stop-at-step", 4)
    ckpt = d / "cut" / "checkpoints" / "step-000004"
    assert ckpt.is_dir(), sorted(p.name for p in (d / "cut").rglob("*"))
    for ranks in (2, 4, 1):
        out = d / f"resumed_{ranks}"
        train(work, out, ranks, "lora_null_v2", "--save-every", 4, "--resume", ckpt)
        assert_same_training(out, d / "whole", "lora_null_v2", f"2-rank checkpoint resumed on {ranks} ranks vs 1")


def test_train_ranks_with_recompute(work):
    """Activation recomputation on the shards gives the same bits as keeping the activations."""
    d = work["dir"] / "train_recompute"
    train(work, d / "keep", 2, "lora")
    train(work, d / "redo", 2, "lora", "--recompute")
    assert result_file(d / "redo", "lora").read_bytes() == result_file(d / "keep", "lora").read_bytes()
    assert [r["loss"] for r in metrics(d / "redo")] == [r["loss"] for r in metrics(d / "keep")]


# ---------------------------------------------------------------- covariance and init


def test_covariance_on_shards_equals_one_rank(work):
    for ranks in (2, 4):
        out = work["dir"] / f"cov_{ranks}.safetensors"
        run("covariance", "--model", work["base"], "--calibration", work["calib"], *CALIB, "--ranks", ranks,
           "--out", out)
        w = worst(out, work["cov"])
        print(f"covariance, {ranks} ranks vs 1: {w:.2e}")
        assert w <= 1e-6
        # q,k,v of layer 0 read the replicated embedding norm: the very same bits
        a, b = load_file(str(out)), load_file(str(work["cov"]))
        k = "model.layers.0.self_attn.q_proj"
        assert np.array_equal(a[k], b[k])


def init(work, out, ranks, method, *source):
    r = run("init", "--model", work["base"], "--method", method, "--rank", R, "--out", out, "--ranks", ranks, *source)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lora_null_v1", "lora_null_v2"])
def test_init_on_shards_equals_one_rank(work, method):
    d = work["dir"] / f"init_{method}"
    one = init(work, d / "r1", 1, method, "--covariance", work["cov"])
    assert one["eigensolves"] == [0]
    for ranks in (2, 4):
        info = init(work, d / f"r{ranks}", ranks, method, "--covariance", work["cov"])
        # 2 layers × 4 layer inputs, basis of input i of layer l on rank (4l + i) mod N
        assert info["ranks"] == ranks and info["eigensolves"] == [8 // ranks] * ranks
        w = worst(d / f"r{ranks}" / "init.safetensors", d / "r1" / "init.safetensors")
        print(f"init {method}, {ranks} ranks vs 1 on the same covariances: {w:.2e}")
        assert w <= 1e-6, f"{ranks} ranks: {w:.3g}"


def test_init_calibrating_on_shards(work):
    """init --ranks 2 --calibration: the shards' covariances (those `covariance --ranks 2` writes) and
    the init on them, as one command."""
    d = work["dir"] / "init_calib"
    cov2 = d / "cov_2.safetensors"
    d.mkdir()
    run("covariance", "--model", work["base"], "--calibration", work["calib"], *CALIB, "--ranks", 2, "--out", cov2)
    init(work, d / "ref", 1, "lora_null_v2", "--covariance", cov2)
    info = init(work, d / "r2", 2, "lora_null_v2", "--calibration", work["calib"], *CALIB)
    assert info["eigensolves"] == [4, 4]
    assert worst(d / "r2" / "init.safetensors", d / "ref" / "init.safetensors") <= 1e-6
    # Against the 1-rank calibration the covariances differ by rounding (≤ 1e-6, above: the shards'
    # GEMMs have other shapes and the row-parallel outputs are sums of partial products). Where the
    # r-th and (r+1)-th smallest eigenvalues are closer than that (o_proj's, of a random model's
    # attention outputs), the basis may rotate into its neighbours: the factors differ, but each A
    # reads its input's covariance as little as the 1-rank A does (tr(A C Aᵀ)/|A|², the knowledge a
    # LoRA-Null A touches) — the same near-null space, as good an init.
    init(work, d / "r1", 1, "lora_null_v2", "--calibration", work["calib"], *CALIB)
    a, b = load_file(str(d / "r2" / "init.safetensors")), load_file(str(d / "r1" / "init.safetensors"))
    cov = load_file(str(work["cov"]))
    reader = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.q_proj", "v_proj": "self_attn.q_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.gate_proj",
              "down_proj": "mlp.down_proj"}
    for k in (k for k in a if k.endswith("lora_A.weight")):
        layer, module = k.split(".")[2], k.split(".")[4]
        C = cov[f"model.layers.{layer}.{reader[module]}"]

        def touched(A):
            A = A.astype(np.float64)
            return np.trace(A @ C @ A.T) / np.trace(A @ A.T)
        print(f"{k}: factors {rel_err(a[k], b[k]):.1e} apart, tr(A C Aᵀ)/|A|² {touched(a[k]):.4e} vs "
              f"{touched(b[k]):.4e}")
        assert abs(touched(a[k]) - touched(b[k])) <= 1e-4 * touched(b[k]), k


def test_init_on_shards_uses_the_cache(work):
    d = work["dir"] / "init_cache"
    src = ["--calibration", work["calib"], "--calibration-max-length", 48, "--calibration-samples", 32,
           "--calibration-cache", d / "cache"]
    first = init(work, d / "a", 2, "lora_null_v2", *src)
    second = init(work, d / "b", 2, "lora_null_v2", *src)
    assert first["from_cache"] is False and second["from_cache"] is True
    assert (d / "a" / "init.safetensors").read_bytes() == (d / "b" / "init.safetensors").read_bytes()


# ---------------------------------------------------------------- errors


def test_rank_count_errors(work):
    d = work["dir"] / "errors"
    d.mkdir()
    cmds = {
        "train": lambda m, n: ["train", "--model", m, "--data", work["train"], "--out", d / "o", "--ranks", n],
        "init": lambda m, n: ["init", "--model", m, "--method", "lora_null_v2", "--rank", 2, "--covariance",
                              work["cov"], "--out", d / "o", "--ranks", n],
        "covariance": lambda m, n: ["covariance", "--model", m, "--calibration", work["calib"], "--out",
                                    d / "c.safetensors", "--ranks", n],
    }
    kv2 = new_model(d, "kv2", num_key_value_heads=2)
    i66 = new_model(d, "i66", num_attention_heads=4, num_key_value_heads=4, intermediate_size=66)
    for name, args in cmds.items():
        for n in (0, -2, 5000):
            one_line_error(run(*args(work["base"], n), check=False), "--ranks", "1..1024")
        one_line_error(run(*args(work["base"], 3), check=False), "--ranks 3", "num_attention_heads 8", "3 ranks")
        one_line_error(run(*args(kv2, 4), check=False), "--ranks 4", "num_key_value_heads 2")
        one_line_error(run(*args(i66, 4), check=False), "--ranks 4", "intermediate_size 66")
        assert not (d / "o").exists() and not (d / "c.safetensors").exists(), name
    for cmd in (["train", "--data", work["train"]], ["init", "--method", "lora_null_v2", "--covariance", work["cov"]]):
        # k_proj is 32 × 64 (4 kv heads of 8): 8 rows per rank of 4
        one_line_error(run(*cmd, "--model", work["base"], "--rank", 10, "--ranks", 4, "--out", d / "o", check=False),
                       "--ranks 4", "LoRA rank 10", "8 × 64", "self_attn.k_proj (32 × 64)")
    # covariances of q,k,v's input only: the 1-rank sentence, before any rank starts
    run("covariance", "--model", work["base"], "--calibration", work["calib"], *CALIB, "--targets", "q",
        "--out", d / "q.safetensors")
    for n in (1, 2):
        one_line_error(run("init", "--model", work["base"], "--method", "lora_null_v2", "--rank", 2, "--covariance",
                           d / "q.safetensors", "--out", d / "o", "--ranks", n, check=False),
                       "no covariance for layer 0 input of self_attn.o_proj")
    one_line_error(run("covariance", "--bench", "--model", work["base"], "--calibration", work["calib"], "--ranks", 2,
                      check=False), "--bench", "--ranks 2")
    one_line_error(run("train", "--model", work["base"], "--data", work["train"], "--out", d / "o", "--calibration",
                      work["calib"], "--covariance", work["cov"], check=False), "--calibration", "--covariance")


def test_cuda_with_several_ranks_is_refused(work):
    """The CPU build has no CUDA backend; the CUDA build refuses N > 1 (one GPU context per process)
    or, on a machine without a GPU, says there is none — one sentence either way."""
    args = ["train", "--model", work["base"], "--data", work["train"], "--out", work["dir"] / "cuda", "--device",
            "cuda", "--ranks", 2]
    one_line_error(run(*args, check=False), "no CUDA backend")
    if not CUDA_BIN.exists():
        pytest.skip("no CUDA build (make cuda-bin): the CUDA build's message is not checked")
    r = subprocess.run([str(CUDA_BIN), *map(str, args)], capture_output=True, text=True, timeout=600)
    one_line_error(r)
    assert "no usable GPU" in r.stderr or "--device cpu only" in r.stderr, r.stderr
