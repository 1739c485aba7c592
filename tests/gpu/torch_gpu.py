"""What the Python GPU benchmarks (bench_peft.py, bench_init_torch.py) need before they start:
torch with a CUDA device (and any further modules). Missing → "SKIP: <name>: <why>" and exit 77,
the code tests/gpu/run.sh reports as a skip, never as a pass."""
import importlib
import sys


def require(name, *modules):
    """Returns torch, then each module in `modules`, imported; exits 77 with the reason if one is
    missing or torch sees no CUDA device."""
    try:
        torch = importlib.import_module("torch")
    except ImportError as e:
        print(f"SKIP: {name}: {e}", flush=True)
        sys.exit(77)
    if not torch.cuda.is_available():
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
