"""Training against torch.optim.AdamW + transformers' warmup/cosine schedule; bit-identical resume;
a tiny model memorises a small set."""
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from engine_ref import TARGET_MODULES, batch_tensors, examples, load, make_model, run, save_model, write_jsonl

STEPS = 20


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_adamw_steps_match_torch(tmp_path, method):
    name = "gqa_llama3"
    model = make_model(name)
    save_model(model, tmp_path / "model")
    rows = examples(model.config.vocab_size, lens=(9, 13, 6, 11))
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    lr, wd, warm = (1e-2, 0.01, 0.1) if method == "lora" else (2e-3, 0.01, 0.1)
    # one batch = the whole file, so every step sees the same examples whatever the order
    common = ["--model", tmp_path / "model", "--data", data, "--method", method, "--rank", 4, "--alpha", 8,
              "--seed", 7, "--batch-size", len(rows), "--lr", lr, "--weight-decay", wd, "--warmup-ratio", warm,
              "--max-grad-norm", 1.0, "--no-shuffle"]
    run("train", *common, "--max-steps", STEPS, "--out", tmp_path / "out")
    ours = [r["loss"] for r in metrics(tmp_path / "out")]
    assert len(ours) == STEPS

    # the same initial adapter: debug-grads with the same seed writes the init
    torch.manual_seed(0)
    if method == "lora":
        run("debug-grads", "--model", tmp_path / "model", "--data", data, "--method", "lora", "--rank", 4,
            "--alpha", 8, "--seed", 7, "--out", tmp_path / "init.safetensors")
        init = load(tmp_path / "init.safetensors")
        ref = get_peft_model(make_model(name), LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES,
                                                          lora_dropout=0.0))
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if "lora_" in n:
                    v = init["init." + n.replace(".default", "")]
                    p.copy_(torch.from_numpy(v))
                    if "lora_B" in n:
                        assert not v.any(), "PEFT's default init has B = 0"
                    else:  # kaiming_uniform(a=√5): U(−1/√d_in, 1/√d_in)
                        bound = 1 / np.sqrt(v.shape[1])
                        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound
        params = [p for p in ref.parameters() if p.requires_grad]
        decay = params
        nodecay = []
    else:
        ref = make_model(name)
        params = list(ref.parameters())
        decay = [p for n, p in ref.named_parameters() if "norm" not in n]
        nodecay = [p for n, p in ref.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, int(np.ceil(warm * STEPS)), STEPS)
    ids, labels = batch_tensors(rows)
    theirs = []
    for _ in range(STEPS):
        loss = ref(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        theirs.append(loss.item())
    diffs = np.abs(np.array(ours) - np.array(theirs))
    assert diffs.max() <= 1e-4, f"per-step loss differences {diffs}"
    assert theirs[-1] < theirs[0] - 0.05, "the reference run must actually learn for the test to mean something"
    lrs = [r["lr"] for r in metrics(tmp_path / "out")]
    assert lrs[0] == 0.0 and abs(max(lrs) - lr) < 1e-9  # warmup starts at 0 as transformers' schedule


def test_grad_accum_equals_big_batch(tmp_path):
    model = make_model("tied")
    save_model(model, tmp_path / "model")
    rows = examples(model.config.vocab_size, lens=(9, 13, 6, 11))
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    common = ["--model", tmp_path / "model", "--data", data, "--rank", 4, "--seed", 3, "--lr", 5e-3, "--no-shuffle",
              "--max-steps", 5]
    run("train", *common, "--batch-size", 4, "--out", tmp_path / "a")
    run("train", *common, "--batch-size", 2, "--grad-accum", 2, "--out", tmp_path / "b")
    la = [r["loss"] for r in metrics(tmp_path / "a")]
    lb = [r["loss"] for r in metrics(tmp_path / "b")]
    assert np.allclose(la, lb, rtol=0, atol=1e-5), (la, lb)


def state_tensors(path):
    return {k: v.tobytes() for k, v in load(path).items()}


@pytest.mark.parametrize("method", ["lora", "lora_fa", "pissa", "full", "lora+pack"])
def test_resume_is_bit_identical(tmp_path, method):
    extra = []
    if method.endswith("+pack"):  # packed rows of 20 tokens (2-3 examples each)
        method, extra = method[:-len("+pack")], ["--pack", 20]
    model = make_model("head_dim")
    save_model(model, tmp_path / "model")
    rows = examples(model.config.vocab_size, seed=5, lens=(7, 12, 5, 9, 10, 8, 6))
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    # 7 examples, 2 per micro-batch × 2 accum: steps cross epoch boundaries mid-step, data reshuffled per epoch
    common = ["--model", tmp_path / "model", "--data", data, "--method", method, "--rank", 4, "--seed", 11,
              "--batch-size", 2, "--grad-accum", 2, "--lr", 5e-3, "--warmup-ratio", 0.2, "--weight-decay", 0.1,
              "--max-steps", 20, "--save-every", 10, *extra]
    run("train", *common, "--out", tmp_path / "full")
    run("train", *common, "--out", tmp_path / "split", "--stop-at-step", 10)
    assert not (tmp_path / "split" / "checkpoints" / "step-000020").exists()
    run("train", *common, "--out", tmp_path / "split", "--resume", tmp_path / "split" / "checkpoints" / "step-000010")
    a = state_tensors(tmp_path / "full" / "checkpoints" / "step-000020" / "state.safetensors")
    b = state_tensors(tmp_path / "split" / "checkpoints" / "step-000020" / "state.safetensors")
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.m.") for k in a)
    assert any(("lora_B" if method != "full" else "embed_tokens") in k for k in a)
    for k in a:
        assert a[k] == b[k], f"{k} differs after resume"
    final = "model.safetensors" if method == "full" else "adapter.safetensors"
    assert (tmp_path / "full" / final).read_bytes() == (tmp_path / "split" / final).read_bytes()
    if method == "pissa":  # the residual base was re-made from the checkpoint's A0/B0
        assert any("lora_A0" in k for k in a)
    # the metrics of the resumed half continue the uninterrupted run's exactly
    ma, mb = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in mb] == list(range(1, 21))
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]


def test_resume_refuses_changed_options(tmp_path):
    model = make_model("tied")
    save_model(model, tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", examples(model.config.vocab_size))
    common = ["--model", tmp_path / "model", "--data", data, "--batch-size", 2, "--max-steps", 4]
    run("train", *common, "--out", tmp_path / "o", "--stop-at-step", 2)
    r = run("train", "--model", tmp_path / "model", "--data", data, "--batch-size", 3, "--max-steps", 4,
            "--out", tmp_path / "o", "--resume", tmp_path / "o" / "checkpoints" / "step-000002", check=False)
    assert r.returncode != 0 and "batch_size" in r.stderr and "resume" in r.stderr


def test_tiny_model_memorises(tmp_path):
    cfg = {"vocab_size": 64, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "model_type": "llama"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run("model", "new", "--config", tmp_path / "cfg.json", "--out", tmp_path / "m", "--seed", 1)
    g = np.random.default_rng(0)
    rows = [{"input_ids": g.integers(0, 64, size=16).tolist()} for _ in range(4)]
    data = write_jsonl(tmp_path / "mem.jsonl", rows)
    run("train", "--model", tmp_path / "m", "--data", data, "--method", "full", "--batch-size", 4, "--lr", 3e-3,
        "--max-steps", 150, "--warmup-ratio", 0.05, "--out", tmp_path / "o")
    losses = [r["loss"] for r in metrics(tmp_path / "o")]
    assert losses[0] > 3.5  # ≈ ln 64 at random init
    assert losses[-1] < 0.1, losses[-10:]
    # the output is a model directory again, and forward on it reproduces the memorised sequence
    (tmp_path / "ids.json").write_text(json.dumps(rows[0]["input_ids"]))
    run("forward", "--model", tmp_path / "o", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "l.st")
    pred = load(tmp_path / "l.st")["logits"][0].argmax(-1)
    assert (pred[:-1] == np.array(rows[0]["input_ids"][1:])).mean() >= 0.9


def test_trained_adapter_loads_in_peft(tmp_path):
    """The adapter a lora run writes is a PEFT adapter: PEFT's logits equal our forward --adapter."""
    from peft import PeftModel
    model = make_model("gqa_llama3")
    save_model(model, tmp_path / "model")
    rows = examples(model.config.vocab_size)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run("train", "--model", tmp_path / "model", "--data", data, "--rank", 4, "--targets", "q,v,down", "--lr", 1e-2,
        "--batch-size", 3, "--max-steps", 5, "--out", tmp_path / "out")
    ids, _ = batch_tensors(rows)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    run("forward", "--model", tmp_path / "model", "--adapter", tmp_path / "out", "--input-ids", tmp_path / "ids.json",
        "--out", tmp_path / "l.st")
    peft_model = PeftModel.from_pretrained(make_model("gqa_llama3"), str(tmp_path / "out")).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    ours = load(tmp_path / "l.st")["logits"]
    from engine_ref import rel_err
    assert rel_err(ours, ref.numpy()) <= 1e-4
    assert rel_err(base.numpy(), ref.numpy()) > 1e-3  # training moved the adapter away from B = 0


def test_validation_loss_in_metrics(tmp_path):
    model = make_model("tied")
    save_model(model, tmp_path / "model")
    rows = examples(model.config.vocab_size)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    run("train", "--model", tmp_path / "model", "--data", data, "--val-data", data, "--eval-every", 2, "--batch-size", 3,
        "--max-steps", 5, "--lr", 1e-2, "--no-shuffle", "--out", tmp_path / "o")
    m = metrics(tmp_path / "o")
    with_val = [r["step"] for r in m if "val_loss" in r]
    assert with_val == [2, 4, 5]  # every 2 steps and after the last
    # the validation set is the training set: its loss after step 2 equals step 3's training loss
    assert abs(m[1]["val_loss"] - m[2]["loss"]) < 1e-5
    ids, labels = batch_tensors(rows)
    with torch.no_grad():
        assert abs(model(input_ids=ids, labels=labels).loss.item() - m[0]["loss"]) < 1e-4


def test_packed_training_matches_per_example_loss(tmp_path):
    """--pack: each step's loss is the mean over the packed examples' own tokens — the first step's
    equals transformers' loss over the same examples run separately (no attention across them)."""
    model = make_model("gqa_llama3")
    save_model(model, tmp_path / "model")
    rows = examples(model.config.vocab_size, seed=4, lens=(9, 13, 6, 11))
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    # one row of 40 tokens holds all four examples (39 tokens): one packed row = the whole file
    run("train", "--model", tmp_path / "model", "--data", data, "--pack", 40, "--batch-size", 1, "--max-steps", 3,
        "--no-shuffle", "--lr", 1e-2, "--out", tmp_path / "o")
    m = metrics(tmp_path / "o")
    assert m[0]["tokens"] == sum(len(r["input_ids"]) for r in rows)
    ids, labels = batch_tensors(rows)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss.item()
    assert abs(m[0]["loss"] - ref) < 1e-4 * ref
