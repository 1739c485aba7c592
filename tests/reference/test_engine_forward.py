"""Our forward logits, loss and every gradient against transformers + PEFT + torch autograd (fp32)."""
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine_ref import (CONFIGS, TARGET_MODULES, batch_tensors, examples, load, make_model, rel_err, run,
                        save_model, write_jsonl)

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    model = make_model(name)
    save_model(model, d / "f32")
    rows = examples(model.config.vocab_size)
    data = write_jsonl(d / "data.jsonl", rows)
    return name, model, d, rows, data


def reference_logits_loss(model, rows):
    ids, labels = batch_tensors(rows)
    out = model(input_ids=ids, labels=labels)
    return out.logits, out.loss


def test_forward_logits_and_loss(tiny, tmp_path):
    name, model, d, rows, data = tiny
    ids, _ = batch_tensors(rows)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    run("forward", "--model", d / "f32", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "logits.safetensors")
    ours = load(tmp_path / "logits.safetensors")["logits"]
    with torch.no_grad():
        ref, ref_loss = reference_logits_loss(model, rows)
    assert rel_err(ours, ref.numpy()) <= TOL
    # the loss (debug-grads reports it for the same batch)
    run("debug-grads", "--model", d / "f32", "--data", data, "--method", "full", "--out", tmp_path / "g.safetensors")
    g = load(tmp_path / "g.safetensors")
    assert abs(float(g["loss"][0]) - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert rel_err(g["logits"], ref.numpy()) <= TOL


def test_bf16_and_sharded_checkpoints_load(tiny, tmp_path):
    name, model, d, rows, data = tiny
    bf = make_model(name, dtype=torch.bfloat16)
    save_model(bf, tmp_path / "bf16")
    f16 = make_model(name, dtype=torch.float16)
    save_model(f16, tmp_path / "f16")
    save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids, _ = batch_tensors(rows)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    run("forward", "--model", tmp_path / "bf16", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "a.st")
    run("forward", "--model", tmp_path / "sharded", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "b.st")
    run("forward", "--model", tmp_path / "f16", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "c.st")
    with torch.no_grad():
        ref_bf, _ = reference_logits_loss(bf.float(), rows)
        ref, _ = reference_logits_loss(model, rows)
        ref_f16, _ = reference_logits_loss(f16.float(), rows)
    assert rel_err(load(tmp_path / "a.st")["logits"], ref_bf.numpy()) <= TOL
    assert rel_err(load(tmp_path / "c.st")["logits"], ref_f16.numpy()) <= TOL
    assert rel_err(load(tmp_path / "b.st")["logits"], ref.numpy()) <= TOL


def test_full_gradients(tiny, tmp_path):
    name, model, d, rows, data = tiny
    run("debug-grads", "--model", d / "f32", "--data", data, "--method", "full", "--out", tmp_path / "g.safetensors")
    g = load(tmp_path / "g.safetensors")
    model.zero_grad()
    ids, labels = batch_tensors(rows)
    model(input_ids=ids, labels=labels).loss.backward()
    checked = 0
    for n, p in model.named_parameters():
        key = "grad." + n
        assert key in g, f"no gradient for {n}"
        err = rel_err(g[key], p.grad.numpy())
        assert err <= TOL, f"{name}: gradient of {n} rel err {err:.2e}"
        checked += 1
    # every weight: embed, lm_head unless tied, final norm, 2 norms + 7 linears per layer
    L = model.config.num_hidden_layers
    assert checked == 2 + (0 if model.config.tie_word_embeddings else 1) + 9 * L


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_lora_gradients_all_targets(tiny, tmp_path, method):
    name, model, d, rows, data = tiny
    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(make_model(name), cfg)
    with torch.no_grad():  # both factors non-zero so that A's gradient is not trivially zero
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    run("debug-grads", "--model", d / "f32", "--data", data, "--method", method, "--adapter", tmp_path / "adapter",
        "--out", tmp_path / "g.safetensors")
    g = load(tmp_path / "g.safetensors")
    ids, labels = batch_tensors(rows)
    out = peft_model(input_ids=ids, labels=labels)
    assert abs(float(g["loss"][0]) - out.loss.item()) <= TOL * out.loss.item()
    out.loss.backward()
    grads = {k[len("grad."):]: v for k, v in g.items() if k.startswith("grad.")}
    seen = 0
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            continue
        key = n.replace(".default", "")
        if method == "lora_fa" and "lora_A" in n:
            assert key not in grads, f"lora_fa must not compute a gradient for frozen {key}"
            continue
        err = rel_err(grads[key], p.grad.numpy())
        assert err <= TOL, f"{name}/{method}: gradient of {key} rel err {err:.2e}"
        seen += 1
    L = model.config.num_hidden_layers
    assert seen == (2 if method == "lora" else 1) * 7 * L
    # base weights are frozen: no gradient for them
    assert not any(k.startswith("model.") for k in grads)


def test_long_sequences_full_gradients(tmp_path):
    """Sequences longer than the CPU attention's query block (64), with llama3 rope past the
    original context: logits and every gradient still match."""
    model = make_model("gqa_llama3")
    save_model(model, tmp_path / "m")
    rows = examples(model.config.vocab_size, seed=9, lens=(100, 71))
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    run("debug-grads", "--model", tmp_path / "m", "--data", data, "--method", "full", "--out", tmp_path / "g.st")
    g = load(tmp_path / "g.st")
    ids, labels = batch_tensors(rows)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert rel_err(g["logits"], out.logits.detach().numpy()) <= TOL
    for n, p in model.named_parameters():
        assert rel_err(g["grad." + n], p.grad.numpy()) <= TOL, n
