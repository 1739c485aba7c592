"""The same training step as bench_gpu's `train` phase in transformers + PEFT, on the same GPU:
LLaMA-3-8B shapes with random bf16 weights, sequence 2048, batch 1, LoRA rank 128 on all seven
targets with lora_A frozen (LoRA-Null-v2 trains B only), AdamW, bf16 autocast-free (weights bf16,
adapter fp32 as PEFT keeps it). Prints tokens/s; exits 77 (a visible skip) when torch with CUDA,
transformers or peft is missing.

usage: bench_peft.py OUT.json [steps] [--device cuda|cpu] [--tiny]"""
import json
import sys

import torch_gpu

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=16384)
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def llama_config(transformers, shape):
    """LLaMA-3's config: transformers 5 names the RoPE settings rope_parameters (theta inside),
    4.x rope_theta + rope_scaling."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = {"rope_parameters": {**ROPE, "rope_theta": 500000.0}}
    else:
        rope = {"rope_theta": 500000.0, "rope_scaling": ROPE}
    return transformers.LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=False, **rope)


def main():
    args = torch_gpu.parse_args(__doc__, "bench_peft.json", steps=3)
    dev = args.device
    torch, peft, transformers = torch_gpu.require("bench_peft", "peft", "transformers", device=dev)
    cfg = llama_config(transformers, TINY if args.tiny else LLAMA3_8B)
    T, rank = (64, 8) if args.tiny else (2048, 128)
    torch.manual_seed(0)
    (model, _), build_s = torch_gpu.timed(torch, dev, lambda: build(torch, peft, transformers, cfg, dev, rank))
    print(f"model built in {build_s:.1f} s")
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=2e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times = []
    for s in range(args.steps + 1):
        loss, dt = torch_gpu.timed(torch, dev, step)
        print(f"step {s}: loss {loss:.4f}, {dt:.3f} s" + (" (warm-up)" if s == 0 else ""))
        if s > 0:
            times.append(dt)
    step_s = sum(times) / len(times)
    tps = T / step_s
    print(f"transformers {transformers.__version__} + peft {peft.__version__} on {dev}: {step_s:.3f} s/step, "
          f"{tps:.0f} tokens/s")
    with open(args.out, "w") as f:
        json.dump({"step_s": step_s, "tokens_per_s": tps, "seq": T, "rank": rank, "tiny": args.tiny,
                   "trained_params": sum(p.numel() for p in trained), "loss": loss, "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__,
                   "device": torch_gpu.device_name(torch, dev)}, f)


def build(torch, peft, transformers, cfg, dev, rank):
    """The bf16 model on `dev` with LoRA (rank, alpha = rank) on all seven targets, lora_A frozen."""
    with torch.device(dev):
        # transformers 5 names it dtype (4.x: torch_dtype)
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", **{dtype_kw: torch.bfloat16})
    lcfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lcfg)
    frozen = 0
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
            frozen += 1
    if frozen != 7 * cfg.num_hidden_layers:
        sys.exit(f"FAIL bench_peft: {frozen} lora_A factors found, not 7 per layer x {cfg.num_hidden_layers}")
    return model, frozen


if __name__ == "__main__":
    main()
