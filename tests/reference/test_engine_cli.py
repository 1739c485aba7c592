"""The CLI's errors: one clear sentence naming what and where, and a non-zero exit."""
import json

from engine_ref import examples, make_model, run, save_model, write_jsonl


def one_line_error(r, *needles):
    assert r.returncode != 0
    msg = r.stderr.strip()
    assert msg.count("\n") == 0, f"expected one line, got:\n{msg}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_missing_model_dir(tmp_path):
    r = run("forward", "--model", tmp_path / "nope", "--input-ids", tmp_path / "x.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r)
    (tmp_path / "x.json").write_text("[1,2]")
    r = run("forward", "--model", tmp_path / "nope", "--input-ids", tmp_path / "x.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r, "nope")


def test_config_that_does_not_match_the_tensors(tmp_path):
    model = make_model("tied")
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 41
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "ids.json").write_text("[1,2,3]")
    r = run("forward", "--model", tmp_path / "m", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r, "model.layers.0.mlp.gate_proj.weight", "[40, 32]", "[41, 32]")


def test_bad_config_json_and_bad_ids(tmp_path):
    (tmp_path / "cfg.json").write_text("{\"vocab_size\": 10,")
    r = run("model", "new", "--config", tmp_path / "cfg.json", "--out", tmp_path / "m", check=False)
    one_line_error(r, "cfg.json", "invalid JSON")
    model = make_model("tied")
    save_model(model, tmp_path / "m2")
    (tmp_path / "ids.json").write_text("[[1,2,3],[4,5]]")
    r = run("forward", "--model", tmp_path / "m2", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r, "ids.json", "row 1")
    (tmp_path / "ids.json").write_text("[1, 2, 999]")
    r = run("forward", "--model", tmp_path / "m2", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r, "999", "vocabulary")


def test_train_option_errors(tmp_path):
    model = make_model("tied")
    save_model(model, tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", examples(model.config.vocab_size))
    base = ["train", "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "o"]
    one_line_error(run(*base, "--rank", "x", check=False), "--rank", "x")
    one_line_error(run(*base, "--method", "dora", check=False), "dora")
    one_line_error(run(*base, "--targets", "q,lm_head", check=False), "lm_head")
    one_line_error(run(*base, "--bogus", "1", check=False), "--bogus")
    one_line_error(run("train", "--model", tmp_path / "m", "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o",
                       check=False), "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": "x"}\n')
    one_line_error(run("train", "--model", tmp_path / "m", "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "o",
                       check=False), "bad.jsonl", "2")


def test_model_new_writes_a_loadable_hf_model(tmp_path):
    cfg = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run("model", "new", "--config", tmp_path / "cfg.json", "--out", tmp_path / "m", "--seed", 3, "--dtype", "bf16")
    from transformers import AutoTokenizer, LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert m.config.hidden_size == 32 and m.config.tie_word_embeddings
    w = m.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < w.float().std().item() < 0.025  # N(0, 0.02)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert len(tok("hello world")["input_ids"]) > 0
    # the same seed gives the same weights
    run("model", "new", "--config", tmp_path / "cfg.json", "--out", tmp_path / "m2", "--seed", 3, "--dtype", "bf16")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()


def test_out_of_memory_is_a_sentence(tmp_path):
    """A batch whose attention probabilities cannot fit (4 heads × 100k² floats = 160 GB) is refused
    with a message, not a crash."""
    model = make_model("tied")
    save_model(model, tmp_path / "m")
    (tmp_path / "ids.json").write_text(json.dumps([[5] * 100_000]))
    r = run("forward", "--model", tmp_path / "m", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r, "out of memory", "100000")


def test_diverging_training_fails_naming_the_step(tmp_path):
    """A learning rate that blows the weights up: the run stops at the step it happened with a
    "not finite" sentence (the worker's training_diverged), instead of a flat ln(V) loss trained on."""
    model = make_model("tied")
    save_model(model, tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", examples(model.config.vocab_size))
    base = ["train", "--model", tmp_path / "m", "--data", data, "--method", "lora", "--rank", "2",
            "--epochs", "3", "--batch-size", "1"]
    r = run(*base, "--out", tmp_path / "o1", "--lr", "1e10", check=False)
    one_line_error(r, "train step 2", "not finite")
    r = run(*base, "--out", tmp_path / "o2", "--lr", "3e38", check=False)
    one_line_error(r, "train step 1", "lora_", "not finite after the update")


def test_model_with_an_inf_weight_is_refused_naming_the_tensor(tmp_path):
    import torch
    model = make_model("tied")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 4] = float("inf")
    save_model(model, tmp_path / "m")
    (tmp_path / "ids.json").write_text("[1,2,3]")
    r = run("forward", "--model", tmp_path / "m", "--input-ids", tmp_path / "ids.json", "--out", tmp_path / "o",
            check=False)
    one_line_error(r, "model.layers.0.mlp.up_proj.weight", "not finite")
