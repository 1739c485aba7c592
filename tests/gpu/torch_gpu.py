"""What the Python GPU benchmarks (bench_peft.py, bench_init_torch.py) share: their command line
and the check, before they start, that torch sees a CUDA device (and that any further modules
import). Missing → "SKIP: <name>: <why>" and exit 77, the code tests/gpu/run.sh reports as a skip,
never as a pass.

Command line of both: OUT.json [steps] [--device cuda|cpu] [--tiny]. The GPU at full size is the
default (what run.sh measures); `--device cpu --tiny` runs the same code on a toy shape in seconds
on a machine without a GPU, so the logic and the library calls are checked there
(tests/gpu/test_gpu.py does)."""
import argparse
import importlib
import sys
import time


def parse_args(doc, default_out, steps=None):
    """The benchmarks' arguments (steps only when `steps` is a default count)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("out", nargs="?", default=default_out, help="where the JSON result goes")
    if steps is not None:
        p.add_argument("steps", nargs="?", type=int, default=steps, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default: what run.sh measures) or cpu (a check of the logic, no timing worth reading)")
    p.add_argument("--tiny", action="store_true", help="a toy shape instead of LLaMA-3-8B's")
    return p.parse_args()


def require(name, *modules, device="cuda"):
    """Returns torch, then each module in `modules`, imported; exits 77 with the reason if one is
    missing or, for device "cuda", torch sees no CUDA device."""
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        print(f"SKIP: {name}: {e}", flush=True)
        sys.exit(77)
    if device == "cuda" and not torch.cuda.is_available():
        print(f"SKIP: {name}: torch has no CUDA device", flush=True)
        sys.exit(77)
    mods = [torch]
    for m in modules:
        try:
            mods.append(importlib.import_module(m))
        except ImportError as e:
            print(f"SKIP: {name}: {e}", flush=True)
            sys.exit(77)
    return mods if modules else torch


def device_name(torch, device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def timed(torch, device, fn):
    """fn()'s result and its wall time in seconds, the device's queue drained before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return r, time.perf_counter() - t
