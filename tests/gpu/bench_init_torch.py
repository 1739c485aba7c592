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
rank 128. Each input's SVD is followed by its targets' factorisations; one line per part as it
finishes, and OUT.json rewritten (atomically) after each, so a step cut by its timeout still leaves
what was measured. Exits 77 (a visible skip) without torch or CUDA. --device cpu --tiny: the same
code on a toy layer (a check of the logic).

usage: bench_init_torch.py OUT.json [--device cuda|cpu] [--tiny]"""
import json
import os

import torch_gpu

# LLaMA-3-8B's layer (hidden, intermediate, q and kv widths), rank, tokens per covariance sample
FULL = dict(hid=4096, inter=14336, qd=4096, kvd=1024, r=128, tokens=1024)
TINY = dict(hid=64, inter=160, qd=64, kvd=32, r=8, tokens=256)


def inputs_and_targets(hid, inter, qd, kvd, **_):
    """The 4 distinct inputs (name, width), each with its targets (name, d_out, d_in)."""
    return [("qkv", hid, [("q_proj", qd, hid), ("k_proj", kvd, hid), ("v_proj", kvd, hid)]),
            ("o", qd, [("o_proj", hid, qd)]),
            ("gate_up", hid, [("gate_proj", inter, hid), ("up_proj", inter, hid)]),
            ("down", inter, [("down_proj", hid, inter)])]


def main():
    args = torch_gpu.parse_args(__doc__, "bench_init_torch.json")
    dev = args.device
    torch = torch_gpu.require("bench_init_torch", device=dev)
    shape = TINY if args.tiny else FULL
    R, TOKENS = shape["r"], shape["tokens"]
    torch.manual_seed(0)
    res = {"device": torch_gpu.device_name(torch, dev), "torch": torch.__version__, "rank": R, "tiny": args.tiny,
           "svd_s": {}, "factor_s": {}, "residual_rel": {}, "complete": False}

    def save():
        """Atomically: a step killed mid-write leaves the previous, whole file."""
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(args.out + ".tmp", args.out)

    # Each input's basis, then its targets' factors: a step cut by its timeout keeps whole parts.
    with torch.no_grad():
        # untimed warm-up: the first call loads the solver library and makes its handle
        torch_gpu.timed(torch, dev, lambda: torch.linalg.svd(torch.randn(256, 256, device=dev)))
        for name, d, targets in inputs_and_targets(**shape):
            x = torch.randn(TOKENS, d, device=dev)
            x = x / x.max().abs()
            C = x.t() @ x / TOKENS
            (U, _, _), dt = torch_gpu.timed(torch, dev, lambda: torch.linalg.svd(C))
            Un = U[:, -R:].contiguous()
            res["svd_s"][name] = dt
            print(f"torch svd of C ({name}, {d} x {d}): {dt:.3f} s", flush=True)
            save()
            del x, C, U
            for tname, dout, din in targets:
                W = torch.randn(dout, din, device=dev) * 0.02

                def factor():
                    P = W @ Un @ Un.t()
                    Up, Sp, Vhp = torch.linalg.svd(P, full_matrices=False)
                    B = Up[:, :R] * Sp[:R].sqrt()
                    A = Sp[:R].sqrt()[:, None] * Vhp[:R]
                    return B, A, W - B @ A

                (B, A, _), dt = torch_gpu.timed(torch, dev, factor)
                # B A is W's projection on the null space (P has rank R): check it, outside the timing
                P = W @ Un @ Un.t()
                res["residual_rel"][tname] = float((P - B @ A).norm() / P.norm())
                res["factor_s"][tname] = dt
                print(f"torch factor {tname} ({dout} x {din}): {dt:.3f} s, |W Un Unt - B A| / |W Un Unt| = "
                      f"{res['residual_rel'][tname]:.1e}", flush=True)
                save()
                del W, P, B, A
    svd = sum(res["svd_s"].values())
    fac = sum(res["factor_s"].values())
    res.update(layer_init_s=svd + fac, model_init_s_est=32 * (svd + fac), complete=True)
    save()
    print(f"torch recipe, one layer: 4 SVDs of C {svd:.2f} s + 7 factorisations {fac:.2f} s = {svd + fac:.2f} s; "
          f"whole model (32 layers) ~ {32 * (svd + fac):.1f} s", flush=True)


if __name__ == "__main__":
    main()
