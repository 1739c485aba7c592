"""The LoRA-Null init of ONE LLaMA-3-8B layer by the torch recipe, on the GPU — the counterpart of
`bench_gpu init` (cuSOLVER syevdx subset eigensolves + r-sized factorisations, fp64):

  per distinct input (q,k,v share one, gate,up share one: 4 per layer, as loranull does — the
  "shared" variant of tests/bench/bench_init.py; the paper's code does one per target, 7):
      U, S, Vh = torch.linalg.svd(C)           full SVD of the d × d covariance (fp32, as the
      U_null = U[:, -r:]                        reference computes it), the r smallest directions
  per target (7):
      P = W0 U_null U_nullᵀ                     d_out × d_in
      Up, Sp, Vhp = torch.linalg.svd(P, full_matrices=False)
      B = Up[:, :r] √Sp[:r],  A = √Sp[:r] Vhp[:r],  W0 − B A

Covariances from one 1024-token random sample per input (C = XᵀX / n), random weights (std 0.02),
rank 128. Prints one line per part as it finishes and rewrites OUT.json after each, so a step cut
by its timeout still leaves what was measured. Exits 77 (a visible skip) without torch or CUDA.

usage: bench_init_torch.py OUT.json"""
import json
import sys
import time

import torch_gpu

HID, INTER, QD, KVD, R, TOKENS = 4096, 14336, 4096, 1024, 128, 1024
INPUTS = [("qkv", HID), ("o", QD), ("gate_up", HID), ("down", INTER)]
TARGETS = [("q_proj", QD, HID, "qkv"), ("k_proj", KVD, HID, "qkv"), ("v_proj", KVD, HID, "qkv"),
           ("o_proj", HID, QD, "o"), ("gate_proj", INTER, HID, "gate_up"), ("up_proj", INTER, HID, "gate_up"),
           ("down_proj", HID, INTER, "down")]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "bench_init_torch.json"
    torch = torch_gpu.require("bench_init_torch")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": R, "svd_s": {}, "factor_s": {},
           "complete": False}

    def save():
        with open(out, "w") as f:
            json.dump(res, f)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        return r, time.perf_counter() - t

    bases = {}
    with torch.no_grad():
        for name, d in INPUTS:
            x = torch.randn(TOKENS, d, device=dev)
            x = x / x.max().abs()
            C = x.t() @ x / TOKENS
            (U, _, _), dt = timed(lambda: torch.linalg.svd(C))
            bases[name] = U[:, -R:].contiguous()
            res["svd_s"][name] = dt
            print(f"torch svd of C ({name}, {d} x {d}): {dt:.3f} s", flush=True)
            save()
            del x, C, U
        for name, dout, din, inp in TARGETS:
            W = torch.randn(dout, din, device=dev) * 0.02
            Un = bases[inp]

            def factor():
                P = W @ Un @ Un.t()
                Up, Sp, Vhp = torch.linalg.svd(P, full_matrices=False)
                B = Up[:, :R] * Sp[:R].sqrt()
                A = Sp[:R].sqrt()[:, None] * Vhp[:R]
                return W - B @ A

            _, dt = timed(factor)
            res["factor_s"][name] = dt
            print(f"torch factor {name} ({dout} x {din}): {dt:.3f} s", flush=True)
            save()
            del W
    svd = sum(res["svd_s"].values())
    fac = sum(res["factor_s"].values())
    res.update(layer_init_s=svd + fac, model_init_s_est=32 * (svd + fac), complete=True)
    save()
    print(f"torch recipe, one layer: 4 SVDs of C {svd:.2f} s + 7 factorisations {fac:.2f} s = {svd + fac:.2f} s; "
          f"whole model (32 layers) ~ {32 * (svd + fac):.1f} s", flush=True)


if __name__ == "__main__":
    main()
