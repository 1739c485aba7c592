"""The same training step as bench_gpu's `train` phase in transformers + PEFT, on the same GPU:
LLaMA-3-8B shapes with random bf16 weights, sequence 2048, batch 1, LoRA rank 128 on all seven
targets with lora_A frozen (LoRA-Null-v2 trains B only), AdamW, bf16 autocast-free (weights bf16,
adapter fp32 as PEFT keeps it). Prints tokens/s; exits 77 (a visible skip) when torch with CUDA,
transformers or peft is missing.

usage: bench_peft.py OUT.json [steps]"""
import json
import sys
import time

import torch_gpu


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "bench_peft.json"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch, peft, transformers = torch_gpu.require("bench_peft", "peft", "transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16,
                                                            attn_implementation="sdpa")
    lcfg = peft.LoraConfig(r=128, lora_alpha=128, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lcfg)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    print(f"model built in {time.time() - t0:.1f} s")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    T = 2048
    ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
    times = []
    for s in range(steps + 1):
        torch.cuda.synchronize()
        ts = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.time() - ts
        print(f"step {s}: loss {loss.item():.4f}, {dt:.3f} s" + (" (warm-up)" if s == 0 else ""))
        if s > 0:
            times.append(dt)
    step = sum(times) / len(times)
    tps = T / step
    print(f"transformers {transformers.__version__} + peft {peft.__version__}: {step:.3f} s/step, {tps:.0f} tokens/s")
    with open(out, "w") as f:
        json.dump({"step_s": step, "tokens_per_s": tps, "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__,
                   "device": torch.cuda.get_device_name()}, f)


if __name__ == "__main__":
    main()
