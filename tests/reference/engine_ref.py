"""Helpers for the engine reference tests: tiny random LLaMAs, data files, and running bin/loranull."""
import json
import math
import os
import pathlib
import subprocess

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin")) / "loranull"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Three shapes transformers supports, each exercising one thing the brief names.
CONFIGS = {
    # grouped-query attention + llama3 rope scaling (original context small enough that all three
    # frequency bands — kept, blended, divided — occur for head_dim 8)
    "gqa_llama3": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       rope_theta=10000.0, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "tied": dict(vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                 tie_word_embeddings=True),
    # head_dim 16 ≠ hidden/heads = 8
    "head_dim": dict(vocab_size=72, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                     tie_word_embeddings=False),
}


def make_model(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(rms_norm_eps=1e-5, initializer_range=0.1, attention_bias=False, mlp_bias=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None, **CONFIGS[name])
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so their gradients and scaling are exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model.to(dtype)


def save_model(model, path, **kw):
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    return path


def examples(vocab, seed=1, lens=(9, 13, 6)):
    """Pre-tokenized examples, the first tokens of each masked from the loss (a prompt)."""
    g = np.random.default_rng(seed)
    out = []
    for n in lens:
        ids = g.integers(3, vocab, size=n).tolist()
        labels = [-100] * 2 + ids[2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch_tensors(rows):
    """Right-padded (B, T) input_ids and labels as transformers takes them (pad id 0, label −100)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]))
    return ids, labels


def run(*args, check=True, env=None, timeout=600):
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    if env:
        e.update(env)
    r = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"loranull {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr}")
    return r


def rel_err(ours, ref):
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} vs reference {ref.shape}"
    denom = np.linalg.norm(ref)
    return np.linalg.norm(ours - ref) / (denom if denom > 0 else 1.0)


def load(path):
    return load_file(str(path))


def cosine_lr_steps(total, warmup_ratio):
    return math.ceil(total * warmup_ratio)
