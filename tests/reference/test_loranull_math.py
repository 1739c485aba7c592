"""loranull's LoRA-Null math against references (issue 3):

- the paper's recipe reimplemented in torch (torch SVD of C, W0 U Uᵀ, SVD of that): same B A,
  residual and row space of A as ours (products and subspaces, not raw factors: signs are free);
- PEFT's own pissa and corda (knowledge-preserved mode) initialisations on a tiny LLaMA:
  same scale·B A and residual base weights as ours, with ours fed the covariance our own C
  accumulation computes from the same activations (itself checked against PEFT's covariance);
- drift from C equals drift measured on the activations, for a PEFT-trained-like update.
"""
import numpy as np
import pytest
import torch

import loranull_math

R = 4


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return loranull_math.build(tmp_path_factory.mktemp("so"))


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def paper_recipe(W0, C, r):
    """The paper's §3.3 exactly as written, in torch fp64: full SVD of C, U_null = last r left
    singular vectors, SVD of W0 U_null U_nullᵀ, B = U'√Σ', A = √Σ' V'ᵀ (first r)."""
    W0 = torch.tensor(W0, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(torch.tensor(C, dtype=torch.float64))
    Un = U[:, -r:]
    P = W0 @ Un @ Un.T
    Up, Sp, Vhp = torch.linalg.svd(P, full_matrices=False)
    B = Up[:, :r] * Sp[:r].sqrt()
    A = Sp[:r].sqrt()[:, None] * Vhp[:r]
    return B.numpy(), A.numpy(), (W0 - B @ A).numpy(), Un.numpy()


def projector(rows):
    """Orthogonal projector onto the row space of a full-row-rank matrix."""
    q, _ = np.linalg.qr(np.asarray(rows, dtype=np.float64).T)
    return q @ q.T


def planted_activations(rng, d, tokens, r, n):
    """n samples whose covariance has a clear gap below its r smallest directions."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spread = np.concatenate([np.full(r, 1e-3) * (1 + np.arange(r)), 1.0 + np.arange(d - r)])
    return [(rng.standard_normal((tokens, d)) * spread) @ Q.T for _ in range(n)]


@pytest.mark.parametrize("d_out,d_in,alpha", [(40, 32, R), (24, 48, 2 * R), (64, 64, 16)])
def test_lora_null_matches_paper_recipe(lm, d_out, d_in, alpha):
    rng = np.random.default_rng(d_out * 1000 + d_in)
    X = [x.astype(np.float32) for x in planted_activations(rng, d_in, 64, R, 5)]
    C = lm.covariance(X)
    # our covariance == the reference's definition
    xs = [x.astype(np.float64) / abs(float(x.max())) for x in X]
    Cref = sum(x.T @ x for x in xs) / len(xs)
    assert rel(C, Cref) < 1e-12
    W0 = (rng.standard_normal((d_out, d_in)) * 0.1).astype(np.float32)
    scale = alpha / R
    for method in ("lora_null_v1", "lora_null_v2"):
        W, A, B = lm.init(method, W0, R, scale=scale, C=C)
        Bt, At, Wt, Un = paper_recipe(W0, C, R)
        prod = scale * B.astype(np.float64) @ A.astype(np.float64)
        e_prod, e_res = rel(prod, Bt @ At), rel(W, Wt)
        e_sub = np.abs(projector(A) - projector(At)).max()
        print(f"{method} {d_out}x{d_in} alpha={alpha}: rel err BA {e_prod:.2e}, residual {e_res:.2e}, "
              f"row-space projector {e_sub:.2e}")
        assert e_prod < 1e-5 and e_res < 1e-6 and e_sub < 1e-5
        # the rows of A span exactly U_null's columns
        assert np.abs(projector(A) - Un @ Un.T).max() < 1e-5
        # and the residual keeps the knowledge activations' outputs: W0' X ≈ W0 X
        x = np.concatenate(X).astype(np.float64)
        out0, out1 = x @ W0.T.astype(np.float64), x @ W.T.astype(np.float64)
        assert rel(out1, out0) < 1e-3


def test_subset_eigensolver_equals_torch_svd_tail(lm):
    rng = np.random.default_rng(7)
    X = [x.astype(np.float32) for x in planted_activations(rng, 96, 80, 8, 4)]
    C = lm.covariance(X)
    U, ev = lm.basis(C, 8)
    Ut, St, _ = torch.linalg.svd(torch.tensor(C))
    assert np.allclose(ev, St.numpy()[::-1][:8], rtol=1e-8, atol=1e-14)
    Un = Ut[:, -8:].numpy()
    assert np.abs(U @ U.T - Un @ Un.T).max() < 1e-8


# ---------------------------------------------------------------- PEFT on a tiny LLaMA

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).float().eval()
    return m


def calib_inputs(n=24, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, length), generator=g) for _ in range(n)]


def linear_modules(model):
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS}


def capture_inputs(model, inputs):
    """Each target linear layer's input, one (tokens × d_in) fp32 array per sample."""
    got, hooks = {}, []
    for name, mod in linear_modules(model).items():
        got[name] = []
        hooks.append(mod.register_forward_hook(
            lambda m, inp, out, name=name: got[name].append(inp[0].detach().squeeze(0).float().numpy().copy())))
    with torch.no_grad():
        for ids in inputs:
            model(ids)
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("alpha", [R, 16])
def test_pissa_matches_peft(lm, alpha):
    from peft import LoraConfig, get_peft_model
    base = tiny_llama()
    W0 = {n: m.weight.detach().numpy().copy() for n, m in linear_modules(base).items()}
    peft_model = get_peft_model(base, LoraConfig(r=R, lora_alpha=alpha, target_modules=TARGETS,
                                                 init_lora_weights="pissa"))
    scale = alpha / R
    checked = 0
    for name, mod in peft_model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        key = name.replace("base_model.model.", "", 1)
        A_p = mod.lora_A["default"].weight.detach().double().numpy()
        B_p = mod.lora_B["default"].weight.detach().double().numpy()
        W_p = mod.base_layer.weight.detach().numpy()
        W, A, B = lm.init("pissa", W0[key], R, scale=scale)
        e_prod = rel(scale * B.astype(np.float64) @ A, mod.scaling["default"] * B_p @ A_p)
        e_res = rel(W, W_p)
        assert e_prod < 2e-5, f"{key}: pissa BA rel err {e_prod:.2e}"
        assert e_res < 2e-5, f"{key}: pissa residual rel err {e_res:.2e}"
        checked += 1
    assert checked == 14


def test_corda_kpm_matches_peft(lm, tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    base = tiny_llama()
    inputs = calib_inputs()
    acts = capture_inputs(base, inputs)
    W0 = {n: m.weight.detach().numpy().copy() for n, m in linear_modules(base).items()}
    cov_file = tmp_path / "cov.pt"
    cfg = LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method="kpm", covariance_file=str(cov_file)))

    def run_model():
        for ids in inputs:
            base(ids)

    preprocess_corda(base, cfg, run_model=run_model)
    peft_cov = torch.load(cov_file)
    peft_model = get_peft_model(base, cfg)
    checked = 0
    for name, mod in peft_model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        key = name.replace("base_model.model.", "", 1)
        C = lm.covariance(acts[key])
        # our fp64 accumulation vs PEFT's fp32 one, on the same activations
        assert rel(C, peft_cov[key].double().numpy()) < 1e-5, key
        W, A, B = lm.init("corda", W0[key], R, scale=1.0, C=C)
        A_p = mod.lora_A["default"].weight.detach().double().numpy()
        B_p = mod.lora_B["default"].weight.detach().double().numpy()
        e_prod = rel(B.astype(np.float64) @ A, B_p @ A_p)
        e_res = rel(W, mod.base_layer.weight.detach().numpy())
        print(f"corda {key}: rel err BA {e_prod:.2e}, residual {e_res:.2e}")
        assert e_prod < 1e-3, f"{key}: corda BA rel err {e_prod:.2e}"
        assert e_res < 1e-4, f"{key}: corda residual rel err {e_res:.2e}"
        checked += 1
    assert checked == 14


def test_drift_from_cov_equals_activations(lm):
    base = tiny_llama()
    acts = capture_inputs(base, calib_inputs(n=6))
    rng = np.random.default_rng(3)
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        X = acts[key]
        C = lm.covariance(X)
        W0 = linear_modules(base)[key].weight.detach().numpy()
        W, A0, B0 = lm.init("lora_null_v1", W0, R, C=C)
        A1 = A0 + 0.05 * rng.standard_normal(A0.shape).astype(np.float32)
        B1 = B0 + 0.05 * rng.standard_normal(B0.shape).astype(np.float32)
        ratio = lm.drift_lowrank(B1, A1, B0, A0, 1.0, C) / lm.drift_dense(W0, C)
        dW = B1.astype(np.float64) @ A1 - B0.astype(np.float64) @ A0
        xs = [x.astype(np.float64) / abs(x.max()) for x in X]
        direct = sum(np.sum((x @ dW.T) ** 2) for x in xs) / sum(np.sum((x @ W0.T.astype(np.float64)) ** 2) for x in xs)
        assert abs(ratio - direct) <= 1e-9 * direct, (key, ratio, direct)
